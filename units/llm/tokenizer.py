"""Text <-> token ids for the llm engine: byte-level BPE over tables compiled from the converted
tokenizer.json, the ChatML prompt, and the streaming text assembler (UTF-8-safe, stop-string-aware)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np


# GPT-2's pre-tokenizer split (Hugging Face ByteLevel with use_regex).
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Words whose ids are remembered (bounded: the cache is cleared when full).
WORD_CACHE = 8192
_PAIR_SHIFT = 21  # ids < 2**21: room for any vocabulary in use


def _byte_level_inverse() -> dict[str, int]:
    """GPT-2 byte-level BPE's printable character -> byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    inverse, extra = {}, 0
    for b in range(256):
        if b in keep:
            inverse[chr(b)] = b
        else:
            inverse[chr(256 + extra)] = b
            extra += 1
    return inverse


def _split_patterns(pre: Mapping[str, Any] | None) -> tuple[bool, str]:
    """(split every digit alone first, the word split regex) of a tokenizer.json byte-level pre-tokenizer:
    ByteLevel (GPT-2), Sequence[Digits, ByteLevel] (smollm) or Sequence[Split(regex), ByteLevel] (llama-3)."""
    steps = list(pre.get("pretokenizers", [])) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    digits, pattern = False, None
    for step in steps:
        kind = step.get("type")
        if kind == "Digits" and step.get("individual_digits"):
            digits = True
        elif kind == "Split" and isinstance(step.get("pattern"), Mapping) and "Regex" in step["pattern"] \
                and step.get("behavior", "Isolated") == "Isolated" and not step.get("invert"):
            pattern = step["pattern"]["Regex"]
        elif kind == "ByteLevel" and not step.get("add_prefix_space"):
            if step.get("use_regex", True):
                pattern = pattern or GPT2_SPLIT
        else:
            raise ValueError(f"unsupported pre-tokenizer step {step!r}")
    if pattern is None:
        raise ValueError("the pre-tokenizer has no word split")
    return digits, pattern


def compile_bpe(tokenizer_json: str | Path) -> dict[str, np.ndarray]:
    """The arrays TextTokenizer runs on, from a byte-level BPE tokenizer.json (done once, at conversion:
    parsing the JSON at every load would leave its ~25 MB of small objects fragmenting the heap)."""
    import json

    spec = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix") or spec.get("normalizer"):
        raise ValueError(f"{tokenizer_json}: not a plain byte-level BPE")
    vocab: dict[str, int] = model["vocab"]
    added = {t["content"]: int(t["id"]) for t in spec.get("added_tokens", [])}
    inverse = _byte_level_inverse()
    pieces: list[bytes] = [b""] * (max(max(vocab.values()), max(added.values(), default=0)) + 1)
    for text, idx in vocab.items():
        pieces[idx] = bytes(inverse[c] for c in text) if all(c in inverse for c in text) else text.encode()
    for text, idx in added.items():
        pieces[idx] = text.encode("utf-8")
    # Merge r joins ids (a, b) into id c: keys a<<SHIFT|b sorted, with their rank and result.
    rows = []
    for rank, merge in enumerate(model["merges"]):
        first, second = merge.split(" ", 1) if isinstance(merge, str) else merge
        rows.append(((vocab[first] << _PAIR_SHIFT) | vocab[second], rank, vocab[first + second]))
    table = np.array(rows, dtype=np.int64).reshape(-1, 3)
    table = table[np.argsort(table[:, 0], kind="stable")]
    digits, pattern = _split_patterns(spec.get("pre_tokenizer"))
    meta = {"added": added, "digits": digits, "pattern": pattern}
    return {
        "blob": np.frombuffer(b"".join(pieces), np.uint8),
        "offsets": np.cumsum([0] + [len(p) for p in pieces]).astype(np.int64),
        # A byte without a token (never seen in training) is dropped, as `tokenizers` does without unk.
        "byte_ids": np.array([vocab.get(ch, -1) for ch, _ in sorted(inverse.items(), key=lambda kv: kv[1])], np.int64),
        "pair_keys": table[:, 0].copy(), "pair_rank": table[:, 1].copy(), "pair_into": table[:, 2].copy(),
        "meta": np.frombuffer(json.dumps(meta, ensure_ascii=False).encode(), np.uint8),
    }


def save_bpe(tokenizer_json: str | Path, out: str | Path) -> None:
    with open(out, "wb") as f:
        np.savez(f, **compile_bpe(tokenizer_json))


class TextTokenizer:
    """Byte-level BPE equal to the `tokenizers` library's encoding of the converted tokenizer.json (tests
    hold it to that) in about 2 MB instead of 13: the token bytes are one buffer, the merges three
    sorted arrays (from tokenizer.npz, see compile_bpe), the pre-tokenizer one `regex` pattern."""

    def __init__(self, tables: str | Path, special_ids: Iterable[int]):
        import json

        import regex

        with np.load(tables) as z:
            self._blob = z["blob"].tobytes()
            self._offsets = z["offsets"]
            self._byte_ids = z["byte_ids"].tolist()
            self._pair_keys, self._pair_rank, self._pair_into = z["pair_keys"], z["pair_rank"], z["pair_into"]
            meta = json.loads(z["meta"].tobytes())
        self.special_ids = frozenset(int(i) for i in special_ids)
        self._ids_by_text: dict[str, int] = meta["added"]
        # Added tokens are cut out first, longest first (as tokenizers' AddedVocabulary does).
        texts = sorted(self._ids_by_text, key=len, reverse=True)
        self._added = regex.compile("(" + "|".join(regex.escape(t) for t in texts) + ")") if texts else None
        self._digits = regex.compile(r"(\p{N})") if meta["digits"] else None
        self._words = regex.compile(meta["pattern"])
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self._offsets) - 1

    def piece(self, token: int) -> bytes:
        """The bytes token stands for (control tokens: their text)."""
        return self._blob[self._offsets[token]:self._offsets[token + 1]]

    def _bpe(self, word: bytes) -> list[int]:
        """Ids of one pre-token: merge the lowest-ranked adjacent pair, all its non-overlapping
        occurrences left to right, until no pair is a merge."""
        ids = [i for i in (self._byte_ids[b] for b in word) if i >= 0]
        keys, ranks, into = self._pair_keys, self._pair_rank, self._pair_into
        while len(ids) > 1:
            arr = np.array(ids, dtype=np.int64)
            pairs = (arr[:-1] << _PAIR_SHIFT) | arr[1:]
            at = np.minimum(np.searchsorted(keys, pairs), len(keys) - 1)
            found = keys[at] == pairs
            if not found.any():
                break
            best = int(np.argmin(np.where(found, ranks[at], np.iinfo(np.int64).max)))
            pair, merged = int(pairs[best]), int(into[at[best]])
            out, i = ids[:best], best
            while i < len(ids):
                if i + 1 < len(ids) and (ids[i] << _PAIR_SHIFT) | ids[i + 1] == pair:
                    out.append(merged)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            ids = out
        return ids

    def _encode_plain(self, text: str, out: list[int]) -> None:
        pieces = self._digits.split(text) if self._digits is not None else [text]
        cache = self._cache
        for piece in pieces:
            for word in self._words.findall(piece):
                ids = cache.get(word)
                if ids is None:
                    if len(cache) >= WORD_CACHE:
                        cache.clear()
                    ids = cache[word] = self._bpe(word.encode("utf-8"))
                out.extend(ids)

    def encode(self, text: str) -> list[int]:
        """Token ids; added-token texts (`<|im_start|>`) become their ids; no BOS is added."""
        out: list[int] = []
        parts = self._added.split(text) if self._added is not None else [text]
        for i, part in enumerate(parts):
            if i % 2:
                out.append(self._ids_by_text[part])
            elif part:
                self._encode_plain(part, out)
        return out

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of ids; bytes that do not form valid UTF-8 become U+FFFD."""
        skip = self.special_ids if skip_special else frozenset()
        return b"".join(self.piece(i) for i in ids if i not in skip).decode("utf-8", "replace")


def message_text(content: Any) -> str:
    """A message's content as text: a string, or OpenAI-style parts of type "text"."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text"]
        if len(parts) == len(content):
            return "".join(parts)
    raise TypeError(f"message content must be a string or a list of text parts, not {type(content).__name__}")


def chatml_prompt(messages: Sequence[Mapping[str, Any]], default_system: str | None,
                  add_generation_prompt: bool = True) -> str:
    """The ChatML prompt, as the GGUF's template renders it: a system turn with `default_system` is
    inserted when the first message is not a system message (none when default_system is empty)."""
    out = []
    if default_system and (not messages or messages[0].get("role") != "system"):
        out.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
    for m in messages:
        out.append(f"<|im_start|>{m['role']}\n{message_text(m.get('content', ''))}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def complete_utf8_prefix(data: bytes | bytearray) -> int:
    """Length of the longest prefix of data that does not end inside a UTF-8 sequence still able to
    complete (a lead byte missing its continuation bytes). Invalid bytes count as complete: they
    decode to U+FFFD instead of being held forever."""
    n = len(data)
    for i in range(n - 1, max(-1, n - 4), -1):
        b = data[i]
        if b < 0x80:
            return n
        if b >= 0xC0:
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4 if b < 0xF8 else 1
            return i if n - i < need else n
    return n


class TextAssembler:
    """Token bytes in, text out: holds back bytes of an unfinished UTF-8 character and text that may
    be the start of a stop string, and cuts the text at the first stop string (not emitted)."""

    def __init__(self, stops: Iterable[str] = ()):
        self.stops = [s for s in stops if s]
        self._raw = bytearray()
        self._text = ""
        self.stopped = False

    def add(self, data: bytes) -> bool:
        """Append a token's bytes; True once a stop string has appeared (text after it is dropped)."""
        if self.stopped:
            return True
        self._raw += data
        cut = complete_utf8_prefix(self._raw)
        if cut:
            self._text += self._raw[:cut].decode("utf-8", "replace")
            del self._raw[:cut]
        hits = [pos for pos in (self._text.find(s) for s in self.stops) if pos >= 0]
        if hits:
            self._text = self._text[:min(hits)]
            self._raw.clear()
            self.stopped = True
        return self.stopped

    def _held(self) -> int:
        """Length of the longest end of the text that could still grow into a stop string."""
        held = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self._text)), held, -1):
                if self._text.endswith(s[:n]):
                    held = n
                    break
        return held

    def take(self) -> str:
        """The text that is safe to emit now."""
        keep = 0 if self.stopped else self._held()
        out, self._text = self._text[:len(self._text) - keep], self._text[len(self._text) - keep:]
        return out

    def finish(self) -> str:
        """Everything left: held text, and unfinished bytes as U+FFFD."""
        out = self._text + (self._raw.decode("utf-8", "replace") if not self.stopped else "")
        self._text, self._raw = "", bytearray()
        return out
