"""Text <-> token ids for the llm engine: the converted tokenizer.json, the ChatML prompt, and the
streaming text assembler (UTF-8-safe, stop-string-aware)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np


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


class TextTokenizer:
    """Byte-level BPE from the converted tokenizer.json, plus the bytes behind every token id."""

    def __init__(self, tokenizer_json: str | Path, special_ids: Iterable[int]):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(tokenizer_json))
        self.special_ids = frozenset(int(i) for i in special_ids)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        inverse = _byte_level_inverse()
        pieces: list[bytes] = [b""] * (max(vocab.values()) + 1)
        for text, idx in vocab.items():
            if idx in self.special_ids or any(c not in inverse for c in text):
                pieces[idx] = text.encode("utf-8")
            else:
                pieces[idx] = bytes(inverse[c] for c in text)
        # One buffer and offsets instead of 49k bytes objects: a few MB less resident.
        self._blob = b"".join(pieces)
        self._offsets = np.cumsum([0] + [len(p) for p in pieces])

    @property
    def vocab_size(self) -> int:
        return len(self._offsets) - 1

    def piece(self, token: int) -> bytes:
        """The bytes token stands for (control tokens: their text)."""
        return self._blob[self._offsets[token]:self._offsets[token + 1]]

    def encode(self, text: str) -> list[int]:
        """Token ids; special-token texts (`<|im_start|>`) become their ids; no BOS is added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of ids; bytes that do not form valid UTF-8 become U+FFFD."""
        skip = self.special_ids if skip_special else frozenset()
        return b"".join(self.piece(i) for i in ids if i not in skip).decode("utf-8", "replace")

    def token_id(self, text: str) -> int | None:
        return self._tok.token_to_id(text)


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
