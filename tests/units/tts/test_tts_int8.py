"""The opt-in int8-decoder voice: built once into the cache, reused, still intelligible."""
from __future__ import annotations

import json

import numpy as np
import pytest

from units.tts.engine import load_tts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def int8_cache(tmp_path_factory, tts_voice):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNITBUS_CACHE_DIR", str(cache))
        voice = load_tts({"quantize": "int8", "threads": 2})
        yield cache, voice


def test_int8_voice_is_built_once_and_cached(int8_cache, monkeypatch):
    cache, voice = int8_cache
    assert voice.backend == "piper"
    built = cache / "en_US-joe-medium-int8"
    model = built / "model.onnx"
    stamp = json.loads((built / "build.json").read_text())
    (source, facts), = stamp["sources"].items()
    assert source.endswith("en_US-joe-medium.onnx") and facts["size"] > 0
    # No temporary folders left: the int8 voice and its split at the decoder (models/piper_split.py).
    assert sorted(p.name for p in cache.iterdir()) == ["en_US-joe-medium-int8", "en_US-joe-medium-int8-split"]
    assert voice.model.decoder is not None
    before = model.stat().st_mtime_ns
    monkeypatch.setenv("UNITBUS_CACHE_DIR", str(cache))
    again = load_tts({"quantize": "int8", "threads": 1})  # a new session (other threads), same cache
    assert again.model is not voice.model
    assert model.stat().st_mtime_ns == before


def test_int8_voice_speaks_with_the_same_timing(int8_cache, tts_voice):
    _, voice = int8_cache
    text = "The weather is sunny and warm this afternoon."
    pcm = voice.synthesize(text)
    assert np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) > 1000
    # Only the decoder is quantized: with the random parts off, the timing is the float voice's.
    ids = tts_voice.model.ids(tts_voice.phonemize(text)[0])
    a = tts_voice.model.run(ids, 0.0, 1.0, 0.0)
    b = voice.model.run(ids, 0.0, 1.0, 0.0)
    assert a.shape == b.shape
    assert np.corrcoef(a, b)[0, 1] > 0.9


def test_whisper_understands_the_int8_voice(int8_cache, word_errors):
    engine = pytest.importorskip("units.asr.engine")
    asr = engine.load_asr({"window_pad_s": 0})
    _, voice = int8_cache
    silence = np.zeros(4800, np.int16)
    phrases = ["Turn on the kitchen lights.", "The quick brown fox jumps over the lazy dog."]
    heard = [asr.transcribe(np.concatenate([silence, voice.synthesize(p), silence])) for p in phrases]
    assert sum(word_errors(p, h) for p, h in zip(phrases, heard)) <= 1, heard  # 13 words


@pytest.mark.filterwarnings("ignore")
def test_unknown_quantize_value_is_refused():
    with pytest.raises(ValueError):
        load_tts({"quantize": "int4"})
