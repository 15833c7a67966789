"""Text preparation for speech: cleaning, clause splitting, and the streaming sentence splitter.

Pure stdlib: used by the engine and by the tts unit when an llm streams text into it (spec §10.5).
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# Words that end in a period without ending the sentence ("e.g. this", "Dr. Smith"). "etc." is
# left out on purpose: it usually does end the sentence.
ABBREVIATIONS = frozenset({
    "e.g", "eg", "i.e", "ie", "cf", "vs", "viz", "approx", "ca",
    "mr", "mrs", "ms", "dr", "prof", "st", "sr", "jr", "mt", "ft", "no", "nos", "vol", "fig", "inc", "ltd", "co",
})

# Full-width punctuation -> the ASCII mark Piper voices know (their phoneme maps have only ASCII).
_FULLWIDTH = {"，": ",", "、": ",", "。": ".", "！": "!", "？": "?", "；": ";", "：": ":"}
_CLOSERS = "\"'”’」』)]）"

# Where the streaming splitter cuts (spec §10.5): ASCII marks only when followed by whitespace, so
# "3.5" and "1,000" stay whole; full-width marks need no space after them.
_STREAM_CUT = re.compile(
    r"[.!?,;]+[" + re.escape(_CLOSERS) + r"]*(?=\s)"
    r"|[，、。！？；]+[" + re.escape(_CLOSERS) + r"]*(?=.)"
    r"|\n",
    re.S,
)
# Clause ends for synthesis: the marks Piper turns into pauses, also at the end of the text.
_CLAUSE_CUT = re.compile(
    r"[.!?,;:]+[" + re.escape(_CLOSERS) + r"]*(?=\s|$)"
    r"|[，、。！？；：]+[" + re.escape(_CLOSERS) + r"]*"
    r"|\n+",
)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_text(text: str) -> str:
    """NFC-normalised text with control characters (NUL ends espeak-ng's input) turned into spaces."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub(" ", text)


def _is_abbreviation(text: str, dot: int) -> bool:
    """Whether the '.' at index `dot` closes an abbreviation or an initial rather than a sentence."""
    start = dot
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    word = text[start:dot].lstrip(_CLOSERS + "(").lower()
    if not word:
        return False
    if len(word) == 1 and word.isalpha():
        return True  # an initial: "J. R. R. Tolkien"
    return word in ABBREVIATIONS


@dataclass(frozen=True)
class Clause:
    text: str
    terminator: str  # one of ". , ? ! ; :" or "" when the text just ends
    sentence_end: bool


def split_clauses(text: str) -> list[Clause]:
    """Text -> clauses with the punctuation that ends each (as espeak-ng would report it to Piper)."""
    text = clean_text(text)
    clauses: list[Clause] = []
    start = 0
    for m in _CLAUSE_CUT.finditer(text):
        marks = "".join(_FULLWIDTH.get(c, c) for c in m.group() if c not in _CLOSERS)
        if marks and set(marks) == {"\n"}:
            term = "."  # a line break ends a sentence
        elif "?" in marks:
            term = "?"
        elif "!" in marks:
            term = "!"
        else:
            term = marks.strip()[:1]
        if term == "." and marks.strip() == "." and _is_abbreviation(text, m.start()):
            continue
        body = text[start:m.start()].strip()
        start = m.end()
        if body:
            clauses.append(Clause(body, term, term in ".?!"))
        elif clauses and not clauses[-1].sentence_end and term in ".?!":
            # "word ,." : the stronger mark wins
            prev = clauses[-1]
            clauses[-1] = Clause(prev.text, term, True)
    rest = text[start:].strip()
    if rest:
        clauses.append(Clause(rest, "", True))
    return clauses


class SentenceSplitter:
    """Cuts streamed text into speakable pieces as soon as each is complete.

    `feed(delta)` returns the pieces completed by this delta; `flush()` returns what is left (at the
    end of the input). Pieces shorter than `min_chars` letters ("Yes," "1.") are held and joined to
    the next, since synthesising them alone sounds choppy; a piece is forced out at a space once the
    buffer exceeds `max_chars`, so a run-on text still starts speaking.
    """

    def __init__(self, min_chars: int = 8, max_chars: int = 300) -> None:
        self.min_chars = min_chars
        self.max_chars = max_chars
        self._buf = ""
        self._held = ""

    def feed(self, delta: str) -> list[str]:
        self._buf += clean_text(delta) if delta else ""
        out: list[str] = []
        while True:
            cut = self._next_cut()
            if cut is None:
                break
            piece, self._buf = self._buf[:cut], self._buf[cut:]
            self._emit(piece, out)
        return out

    def flush(self) -> str:
        rest = " ".join(p for p in (self._held, self._buf.strip()) if p)
        self._held = ""
        self._buf = ""
        return rest.strip()

    def _next_cut(self) -> int | None:
        for m in _STREAM_CUT.finditer(self._buf):
            if m.group() != "\n" and m.group()[0] == "." and _is_abbreviation(self._buf, m.start()):
                if len(m.group().rstrip(_CLOSERS)) == 1:
                    continue
            return m.end()
        if len(self._buf) > self.max_chars:
            space = self._buf.rfind(" ", 0, self.max_chars)
            return space + 1 if space > 0 else self.max_chars
        return None

    def _emit(self, piece: str, out: list[str]) -> None:
        text = " ".join(p for p in (self._held, piece.strip()) if p)
        if sum(c.isalnum() for c in text) < self.min_chars:
            self._held = text
            return
        self._held = ""
        out.append(text)
