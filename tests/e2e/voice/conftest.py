"""Fixtures of the voice-unit tests: speech clips synthesized once per session with espeak-ng and sox."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Under --import-mode=importlib a test folder is not on sys.path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import voiceaudio  # noqa: E402


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> dict:
    """Speech over low noise: `wake` ("hey jarvis"), `lights`, `question`, `chain` (wake then question), `story` (wake
    then a request for a long answer),
    `silence`; `<name>_spans` hold the (start, end) seconds of each spoken part."""
    assert voiceaudio.have_tools(), "espeak-ng and sox are needed to make the test speech"
    folder = tmp_path_factory.mktemp("voice_audio")
    wake = voiceaudio.speech("hey jarvis", folder)
    lights = voiceaudio.speech("turn on the kitchen lights", folder)
    question = voiceaudio.speech("what is the capital of france", folder)
    story = voiceaudio.speech("tell me a long story about a dragon", folder)
    out: dict = {"folder": folder}
    for name, parts in {
        "wake": [0.5, wake, 1.0],
        "lights": [0.3, lights, 0.5],
        "question": [0.3, question, 2.0],
        "chain": [0.5, wake, 1.0, question, 2.0],
        "story": [0.5, wake, 1.0, story, 2.0],
        "silence": [2.0],
    }.items():
        out[name], out[f"{name}_spans"] = voiceaudio.scene(parts)
    return out
