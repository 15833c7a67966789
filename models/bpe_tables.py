"""Byte-level BPE tables for the llm engine's tokenizer, compiled once at conversion from a tokenizer.json.

Parsing tokenizer.json at every load would leave its ~25 MB of small objects fragmenting the llm heap, so
the converter turns it into a few numpy arrays (tokenizer.npz) that units/llm/tokenizer.py runs on. The
asr only turns ids back into text: `PieceTable` reads just the token bytes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

# GPT-2's pre-tokenizer split (Hugging Face ByteLevel with use_regex).
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PAIR_SHIFT = 21  # ids < 2**21: room for any vocabulary in use


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
        rows.append(((vocab[first] << PAIR_SHIFT) | vocab[second], rank, vocab[first + second]))
    table = np.array(rows, dtype=np.int64).reshape(-1, 3)
    table = table[np.argsort(table[:, 0], kind="stable")]
    digits, pattern = _split_patterns(spec.get("pre_tokenizer"))
    meta = {"added": added, "digits": digits, "pattern": pattern, "pair_shift": PAIR_SHIFT}
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


class PieceTable:
    """Token ids -> text from a tokenizer.npz's token bytes: the asr's decoding in 0.4 MB (Whisper's
    vocabulary) instead of the `tokenizers` object's 11 MB."""

    def __init__(self, tables: str | Path):
        with np.load(tables) as z:
            self._blob = z["blob"].tobytes()
            self._offsets = z["offsets"].tolist()
            meta = json.loads(z["meta"].tobytes())
        self.added_ids = frozenset(int(i) for i in meta["added"].values())

    def decode(self, ids: Any, skip_added: bool = True) -> str:
        """Text of ids (added tokens, Whisper's special ones, left out unless skip_added is false);
        bytes that do not form valid UTF-8 become U+FFFD, as `tokenizers` decodes byte-level BPE."""
        skip = self.added_ids if skip_added else frozenset()
        off = self._offsets
        return b"".join(self._blob[off[i]:off[i + 1]] for i in ids if i not in skip).decode("utf-8", "replace")
