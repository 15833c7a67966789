"""Spoken test commands synthesized with espeak-ng, and word error rate (shared by tests and the benchmark)."""
from __future__ import annotations

import re
import shutil
import wave
from pathlib import Path

import numpy as np

from support import espeak_wav, word_edit_distance

COMMANDS = [
    "turn on the kitchen lights",
    "what is the weather like today",
    "set a timer for ten minutes",
    "play some music in the living room",
    "what time is it",
    "open the garage door",
    "remind me to call my mother tomorrow",
    "how far is the moon from the earth",
    "stop the alarm",
    "turn the volume down please",
    "tell me a joke",
    "close the curtains in the bedroom",
]
# (voice, words per minute): three speakers, speeds 130..170.
VOICES = [("en-us", 150), ("en-us+f3", 130), ("en-gb", 170)]


def have_tools() -> bool:
    return bool(shutil.which("espeak-ng") and shutil.which("sox"))


def synthesize(text: str, voice: str, speed: int, out: Path) -> Path:
    """espeak-ng speech resampled by sox to 16 kHz mono 16-bit WAV."""
    return espeak_wav(text, out, voice, speed)


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)


def build_set(folder: Path, commands: list[str] = COMMANDS, voices=VOICES) -> list[tuple[str, Path]]:
    """(reference text, wav) for every command, the voice cycling so each command gets one speaker."""
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i, text in enumerate(commands):
        voice, speed = voices[i % len(voices)]
        items.append((text, synthesize(text, voice, speed, folder / f"cmd{i:02d}_{voice.replace('+', '_')}_{speed}.wav")))
    return items


_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}


def normalize(text: str) -> list[str]:
    """Lower case, no punctuation, small numbers as digits (Whisper writes "10" for "ten")."""
    words = re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()
    return [_NUMBERS.get(w, w) for w in words]


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edit distance in words, reference word count)."""
    ref = normalize(reference)
    return word_edit_distance(ref, normalize(hypothesis)), len(ref)


def wer(pairs: list[tuple[str, str]]) -> float:
    errors = total = 0
    for ref, hyp in pairs:
        e, n = word_errors(ref, hyp)
        errors, total = errors + e, total + n
    return errors / max(total, 1)
