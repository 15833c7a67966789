from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# The audio helpers are shared with tests/bench/bench_kws.py; under --import-mode=importlib a test folder
# is not on sys.path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import wakeaudio  # noqa: E402

MANIFEST = Path(__file__).resolve().parents[3] / "models" / "mode_openwakeword.json"


@pytest.fixture(scope="session")
def kws_params() -> dict:
    return json.loads(MANIFEST.read_text())["mode_param"]


@pytest.fixture(scope="session")
def kws_model(kws_params):
    from units.kws.engine import load_kws

    return load_kws(kws_params)


@pytest.fixture(scope="session")
def wake_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kws_audio")


@pytest.fixture(scope="session")
def positives(wake_dir) -> list[wakeaudio.Scene]:
    return wakeaudio.positive_scenes(wake_dir)


@pytest.fixture(scope="session")
def negatives(wake_dir) -> list[wakeaudio.Scene]:
    return wakeaudio.negative_scenes(wake_dir) + wakeaudio.noise_scenes()
