"""Fixtures for the asr engine tests: the real Whisper model and espeak-ng speech, built once per session."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def _load_helper():
    """tests/units/asr/asr_speech.py as module `asr_speech` (pytest runs with --import-mode=importlib)."""
    spec = importlib.util.spec_from_file_location("asr_speech", Path(__file__).with_name("asr_speech.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["asr_speech"] = module
    spec.loader.exec_module(module)
    return module


asr_speech = sys.modules.get("asr_speech") or _load_helper()


@pytest.fixture(scope="session")
def asr_engine():
    from units.asr.engine import load_asr

    return load_asr({})


@pytest.fixture(scope="session")
def spoken_commands(tmp_path_factory):
    """(reference text, 16 kHz wav) for 12 commands over three voices at 130, 150 and 170 words/min."""
    if not asr_speech.have_tools():
        pytest.skip("espeak-ng and sox are needed to synthesize test speech")
    return asr_speech.build_set(tmp_path_factory.mktemp("asr_speech"))
