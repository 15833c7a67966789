"""Fixtures of the Wyoming tests: one real stack (sys, asr, kws, tts and llm units, the Wyoming server)
shared by the session, and espeak-ng speech."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

# Under --import-mode=importlib a test folder is not on sys.path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import espeak_pcm, trim_silence  # noqa: E402
from wyclient import RATE, start_wyoming  # noqa: E402


@pytest.fixture(scope="session")
def wyoming_stack(tmp_path_factory):
    ws = start_wyoming(tmp_path_factory.mktemp("wyoming"))
    yield ws
    ws.stack.stop()
    assert "Traceback" not in ws.stack.log(), ws.stack.log()[-4000:]  # no event crashed anything


@pytest.fixture(scope="session")
def speech(tmp_path_factory) -> dict:
    """16 kHz int16 espeak-ng speech with a little silence around it, over low noise."""
    folder = tmp_path_factory.mktemp("wyoming_audio")
    rng = np.random.default_rng(0)

    def scene(text: str, before: float = 0.5, after: float = 1.0) -> np.ndarray:
        pcm = trim_silence(espeak_pcm(text, folder))
        parts = [np.zeros(int(before * RATE), np.int16), pcm, np.zeros(int(after * RATE), np.int16)]
        out = np.concatenate(parts).astype(np.float64) + rng.normal(0.0, 30.0, sum(p.size for p in parts))
        return np.clip(np.rint(out), -32768, 32767).astype(np.int16)

    return {"wake": scene("hey jarvis"), "lights": scene("turn on the kitchen lights", 0.3, 0.5),
            "silence": np.zeros(2 * RATE, np.int16) + rng.normal(0, 30, 2 * RATE).astype(np.int16)}
