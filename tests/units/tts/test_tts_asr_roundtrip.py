"""Whisper (units/asr) transcribes the Piper voice's speech back to the text it was given."""
from __future__ import annotations

import numpy as np
import pytest

PHRASES = [
    "Turn on the kitchen lights.",
    "What is the weather like today?",
    "The quick brown fox jumps over the lazy dog.",
]


# The voice samples its timing and timbre at random (noise_scale, noise_w) and Whisper tiny.en slips
# now and then ("weather light today"): allow one word in ten wrong, still far from garbled speech.
MAX_WER = 0.1


@pytest.fixture(scope="module")
def asr():
    engine = pytest.importorskip("units.asr.engine")
    # The full 30 s window is Whisper as trained: this tests the voice, not the encoder-window shortcut.
    return engine.load_asr({"window_pad_s": 0})


@pytest.mark.slow
@pytest.mark.parametrize("speed", [1.0, 1.5])
def test_whisper_understands_the_voice(tts_voice, asr, word_errors, speed):
    silence = np.zeros(4800, np.int16)  # 0.3 s each side, as a recording would have
    errors, heard = 0, []
    for phrase in PHRASES:
        pcm = tts_voice.synthesize(phrase, speed=speed)
        heard.append(asr.transcribe(np.concatenate([silence, pcm, silence])))
        errors += word_errors(phrase, heard[-1])
    assert errors <= MAX_WER * sum(len(p.split()) for p in PHRASES), f"at speed {speed} heard {heard}"


@pytest.mark.slow
def test_whisper_understands_the_fallback_voice(espeak_voice, asr, word_errors):
    silence = np.zeros(4800, np.int16)
    heard = asr.transcribe(np.concatenate([silence, espeak_voice.synthesize(PHRASES[0]), silence]))
    assert word_errors(PHRASES[0], heard) <= 1, heard
