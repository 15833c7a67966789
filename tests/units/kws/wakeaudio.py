"""Wake-word test audio synthesized with espeak-ng (shared by the kws tests and tests/bench/bench_kws.py).

Each positive is a wake phrase placed at a known time inside low background noise, so tests can check when
a detection fires. espeak-ng's own leading and trailing silence is trimmed before placement.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from support import espeak_pcm, trim_silence

SAMPLE_RATE = 16000
WAKE_TEXTS = {"HEY JARVIS": "hey jarvis", "HEY RHASSPY": "hey rhasspy", "ALEXA": "alexa"}
# (voice, words per minute). The heads score espeak-ng's en-us+f2/f3, en-029 and en-gb-scotland renderings
# of "alexa" below 0.5 (the openwakeword library gives the same scores): those voices are left out.
WAKE_VOICES = [
    ("en-gb", 120), ("en-gb", 150), ("en-gb+f4", 120), ("en-gb+f4", 150), ("en-gb-x-rp", 120),
    ("en-gb-x-rp", 150), ("en-us", 120), ("en-us", 150), ("en-us+m7", 120), ("en-us+m7", 150),
]
NEGATIVE_SENTENCES = [
    "turn on the kitchen lights",
    "what is the weather like today",
    "please play some relaxing music",
    "the quick brown fox jumps over the lazy dog",
    "set a timer for ten minutes",
    "hey there, how are you doing",
    "remind me to buy milk tomorrow morning",
    "my neighbour drives a red car",
]
NEGATIVE_VOICES = [("en-us", 160), ("en-gb", 140), ("en-us+f3", 150)]
NOISE_RMS = 30.0  # background under every scene, about -60 dBFS


def have_tools() -> bool:
    return bool(shutil.which("espeak-ng") and shutil.which("sox"))


def synthesize(text: str, voice: str, speed: int, folder: Path) -> np.ndarray:
    """16 kHz mono int16 speech from espeak-ng, resampled by sox."""
    return espeak_pcm(text, folder, voice, speed)


def trim(speech: np.ndarray, level: int = 200) -> np.ndarray:
    return trim_silence(speech, level)


@dataclass
class Scene:
    pcm: np.ndarray  # int16
    speech: list[tuple[float, float]]  # (start_s, end_s) of each phrase
    label: str


def place(phrases: list[np.ndarray], rng: np.random.Generator, lead_s: tuple[float, float] = (0.6, 1.6),
          gap_s: float = 1.0, tail_s: float = 1.5, label: str = "") -> Scene:
    """Phrases in a row over background noise: a random lead-in (so steps fall at varied phases)."""
    parts, spans, t = [], [], 0
    lead = int(rng.uniform(*lead_s) * SAMPLE_RATE)
    parts.append(np.zeros(lead, np.float64))
    t = lead
    for i, phrase in enumerate(phrases):
        spans.append((t / SAMPLE_RATE, (t + len(phrase)) / SAMPLE_RATE))
        parts.append(phrase.astype(np.float64))
        t += len(phrase)
        pause = int((gap_s if i + 1 < len(phrases) else tail_s) * SAMPLE_RATE)
        parts.append(np.zeros(pause, np.float64))
        t += pause
    audio = np.concatenate(parts)
    audio += rng.normal(0.0, NOISE_RMS, audio.size)
    return Scene(np.clip(audio, -32768, 32767).astype(np.int16), spans, label)


def positive_scenes(folder: Path, seed: int = 7) -> list[Scene]:
    rng = np.random.default_rng(seed)
    scenes = []
    for keyword, text in WAKE_TEXTS.items():
        for voice, speed in WAKE_VOICES:
            phrase = trim(synthesize(text, voice, speed, folder))
            scenes.append(place([phrase], rng, label=f"{keyword}|{voice}|{speed}"))
    return scenes


def negative_scenes(folder: Path, seed: int = 11) -> list[Scene]:
    rng = np.random.default_rng(seed)
    scenes = []
    for voice, speed in NEGATIVE_VOICES:
        phrases = [trim(synthesize(text, voice, speed, folder)) for text in NEGATIVE_SENTENCES]
        scenes.append(place(phrases, rng, gap_s=0.7, label=f"sentences|{voice}|{speed}"))
    return scenes


def noise_scenes(seconds: float = 10.0, seed: int = 13) -> list[Scene]:
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    white = rng.normal(0.0, 2000.0, n)
    hum = 6000.0 * np.sin(2 * np.pi * 50 * t) + 1500.0 * np.sin(2 * np.pi * 150 * t) + rng.normal(0, NOISE_RMS, n)
    return [Scene(np.clip(x, -32768, 32767).astype(np.int16), [], label)
            for x, label in ((white, "white noise"), (hum, "50 Hz hum"))]
