from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

# Under --import-mode=importlib a test folder is not on sys.path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from vadaudio import SENTENCES, scene, speak  # noqa: E402

MANIFEST = Path(__file__).resolve().parents[3] / "models" / "mode_silero-vad.json"


@pytest.fixture(scope="session")
def vad_params() -> dict:
    return json.loads(MANIFEST.read_text())["mode_param"]


@pytest.fixture(scope="session")
def vad_model(vad_params):
    from units.vad.engine import load_vad

    return load_vad(vad_params)


@pytest.fixture(scope="session")
def phrases(tmp_path_factory) -> list[np.ndarray]:
    folder = tmp_path_factory.mktemp("vad_audio")
    return [speak(text, voice, speed, folder) for text, voice, speed in SENTENCES]


@pytest.fixture(scope="session")
def speech_scene(phrases):
    return scene(phrases, [1.3, 1.6, 1.2], np.random.default_rng(21))
