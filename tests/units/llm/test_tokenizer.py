"""Tokenizer ids against an independent byte-level BPE run directly over the GGUF vocabulary and merges
(the smollm pre-tokenizer: every digit alone, then GPT-2's split) and against the `tokenizers` library
on the converted tokenizer.json, plus exact round trips."""
from __future__ import annotations

import pathlib
import random

import pytest
import regex  # test dependency: \p{L} classes for the reference pre-tokenizer

GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
TRICKY = [
    "Hello, world!",
    "1234567890 and 3.14159, 2025-11-22",
    "a  b   c    d\t\te\n\nf \n g",
    "   leading and trailing   ",
    "tabs\tand\nnewlines\r\n\r\nend",
    "日本語のテキストと中文字符",
    "emoji 😀👍🏽 and 👨‍👩‍👧 family",
    "accents: café naïve résumé Ångström Øre",
    "don't won't I'm you'll they've we'd it's",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "mixed<|endoftext|>special <repo_name>x",
    "x² + y³ = z⁴ ½ ⅓ Ⅻ",
    "",
    " ",
    "\n",
]


class ReferenceBpe:
    def __init__(self, reader):
        f = reader.fields
        self.tokens = list(f["tokenizer.ggml.tokens"].contents())
        types = f["tokenizer.ggml.token_type"].contents()
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(f["tokenizer.ggml.merges"].contents())}
        self.specials = sorted((t for t, k in zip(self.tokens, types) if k == 3), key=len, reverse=True)
        printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
        extra = iter(range(256, 512))
        self.byte_char = {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}

    def _bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == float("inf"):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        for s in self.specials:
            if s in text:
                head, _, tail = text.partition(s)
                return self.encode(head) + [self.ids[s]] + self.encode(tail)
        out = []
        for piece in regex.split(r"(\p{N})", text):
            for word in GPT2_SPLIT.findall(piece):
                mapped = "".join(self.byte_char[b] for b in word.encode("utf-8"))
                out += [self.ids[p] for p in self._bpe(mapped)]
        return out


@pytest.fixture(scope="module")
def reference(gguf_reader):
    return ReferenceBpe(gguf_reader)


@pytest.mark.parametrize("text", TRICKY)
def test_ids_match_reference_bpe(engine, reference, text):
    assert engine.encode(text) == reference.encode(text)


def test_ids_match_the_tokenizers_library(engine, model_dir):
    from tokenizers import Tokenizer

    library = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    rng = random.Random(7)
    alphabet = list("\x00\x04\x7f abcXYZ\t\n\r0123456789'.,!?-_éüñßÅ日本語中文😀👍🏽\u200d½²Ⅻ\u00a0\u3000") + [
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "'s", "'ll", " the", " 1", "  ", "\n\n"]
    texts = TRICKY + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(1500)]
    texts.append(pathlib.Path(__file__).read_text(encoding="utf-8"))  # a long text: this file
    for text in texts:
        assert engine.encode(text) == library.encode(text, add_special_tokens=False).ids, repr(text)


@pytest.mark.parametrize("text", TRICKY)
def test_decode_round_trip_is_exact(engine, text):
    assert engine.decode(engine.encode(text)) == text


def test_digits_are_split_one_by_one(engine, reference):
    ids = engine.encode("2025")
    assert ids == [reference.ids[d] for d in "2025"]


def test_special_tokens_and_no_bos(engine):
    assert engine.encode("<|im_start|>") == [1]
    assert engine.encode("<|im_end|>") == [2]
    assert engine.encode("hi")[0] != engine.bos_id  # no automatic BOS
    assert engine.decode([1, 2], skip_special=True) == ""


def test_partial_utf8_decodes_to_replacement(engine):
    ids = engine.encode("😀")
    assert len(ids) > 1  # the emoji is several byte tokens
    assert "\ufffd" in engine.decode(ids[:1])


def test_chat_prompt_default_system_and_override(engine):
    msgs = [{"role": "user", "content": "Hi"}]
    assert engine.chat_prompt(msgs) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert engine.chat_prompt(msgs, system_default="Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    own = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert engine.chat_prompt(own) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert engine.chat_prompt(msgs, system_default="").startswith("<|im_start|>user\n")
