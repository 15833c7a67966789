"""Text <-> token ids for the llm engine: byte-level BPE over tables compiled from the converted
tokenizer.json (models/bpe_tables.py), the ChatML prompt, and the streaming text assembler (UTF-8-safe,
stop-string-aware).

Hand-written instead of loading the `tokenizers` library, for a measured reason: that library costs the
llm process 13 MB of resident memory (its Rust heap and the parsed tokenizer.json), this encoder about 2 MB
on the same vocabulary. tests/units/llm/test_tokenizer.py
holds it equal to `tokenizers` on tricky strings, 1500 random strings and a long text."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

# Words whose ids are remembered (bounded: the cache is cleared when full).
WORD_CACHE = 8192


class TextTokenizer:
    """Byte-level BPE equal to the `tokenizers` library's encoding of the converted tokenizer.json (tests
    hold it to that) in about 2 MB instead of 13: the token bytes are one buffer, the merges three
    sorted arrays (from tokenizer.npz, see models/bpe_tables.py), the pre-tokenizer one `regex` pattern."""

    def __init__(self, tables: str | Path, special_ids: Iterable[int]):
        import json

        import regex

        with np.load(tables) as z:
            self._blob = z["blob"].tobytes()
            self._offsets = z["offsets"]
            self._byte_ids = z["byte_ids"].tolist()
            self._pair_keys, self._pair_rank, self._pair_into = z["pair_keys"], z["pair_rank"], z["pair_into"]
            meta = json.loads(z["meta"].tobytes())
        self._shift = int(meta["pair_shift"])
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
            pairs = (arr[:-1] << self._shift) | arr[1:]
            at = np.minimum(np.searchsorted(keys, pairs), len(keys) - 1)
            found = keys[at] == pairs
            if not found.any():
                break
            best = int(np.argmin(np.where(found, ranks[at], np.iinfo(np.int64).max)))
            pair, merged = int(pairs[best]), int(into[at[best]])
            out, i = ids[:best], best
            while i < len(ids):
                if i + 1 < len(ids) and (ids[i] << self._shift) | ids[i + 1] == pair:
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
