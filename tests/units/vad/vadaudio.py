"""Speech scenes for the vad tests: espeak-ng phrases placed at known times over low noise."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from support import espeak_pcm, trim_silence

SAMPLE_RATE = 16000
SENTENCES = [
    ("turn on the kitchen lights", "en-us", 150),
    ("what is the weather like today", "en-gb", 140),
    ("please remind me to call my mother tomorrow", "en-us+f3", 165),
]


def speak(text: str, voice: str, speed: int, folder: Path) -> np.ndarray:
    """espeak-ng speech at 16 kHz with its leading and trailing silence cut, so its bounds are known."""
    return trim_silence(espeak_pcm(text, folder, voice, speed))


def scene(phrases: list[np.ndarray], gaps_s: list[float], rng: np.random.Generator, noise_rms: float = 30.0):
    """Phrases separated by the given silences over low noise; returns pcm and the (start_s, end_s) spans."""
    parts, spans, t = [], [], 0
    for phrase, gap in zip(phrases, gaps_s):
        pause = np.zeros(int(gap * SAMPLE_RATE))
        parts.append(pause)
        t += pause.size
        spans.append((t / SAMPLE_RATE, (t + phrase.size) / SAMPLE_RATE))
        parts.append(phrase.astype(np.float64))
        t += phrase.size
    parts.append(np.zeros(int(1.5 * SAMPLE_RATE)))
    audio = np.concatenate(parts)
    audio += rng.normal(0.0, noise_rms, audio.size)
    return np.clip(audio, -32768, 32767).astype(np.int16), spans
