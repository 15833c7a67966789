"""A sentence decoded in chunks (models/piper_split.py): the same audio as decoded whole, out sooner."""
from __future__ import annotations

import numpy as np
import pytest

from units.tts import engine

QUIET = (0.0, 1.0, 0.0)  # no noise: the front gives the same frames every run


@pytest.fixture(scope="module")
def model(tts_voice):
    assert tts_voice.model.decoder is not None, "the voice was not split at its decoder"
    return tts_voice.model


def test_chunks_decode_to_the_whole_sentence(model, tts_voice):
    ids = model.ids(tts_voice.phonemize("The weather is sunny and warm this afternoon, so we walk.")[0])
    frames = model.frames(ids, *QUIET)
    whole = model.decode(frames, 0, frames.shape[2])
    assert whole.size == frames.shape[2] * model.hop
    np.testing.assert_allclose(model.run(ids, *QUIET), whole, atol=1e-5)
    spans = engine.chunk_spans(frames.shape[2])
    chunks = [model.decode(frames, a, b) for a, b in spans]
    sizes = [c.size // model.hop for c in chunks]
    assert sizes[0] == engine.FIRST_FRAMES and sizes[1] == 2 * engine.FIRST_FRAMES and sum(sizes) == frames.shape[2]
    np.testing.assert_allclose(np.concatenate(chunks), whole, atol=1e-5)
    # Without the context frames a chunk's edges differ from the whole decode: the context is needed.
    bare = model._decode(frames[:, :, 24:48])
    assert np.abs(bare - whole[24 * model.hop:48 * model.hop]).max() > 1e-3


def test_streamed_sentence_is_seamless_at_the_bus_rate(tts_voice, monkeypatch):
    monkeypatch.setattr(tts_voice, "noise_scale", 0.0)
    monkeypatch.setattr(tts_voice, "noise_w", 0.0)
    text = "Hello there, my friend, how are you doing on this fine and sunny day?"
    streamed = list(tts_voice.iter_synthesize(text))
    assert len(streamed) >= 3  # one sentence, several chunks
    monkeypatch.setattr(engine, "FIRST_FRAMES", 10_000)  # one chunk: the sentence decoded whole
    whole = list(tts_voice.iter_synthesize(text))
    assert len(whole) <= 2
    a, b = np.concatenate(streamed).astype(np.int32), np.concatenate(whole).astype(np.int32)
    assert a.size == b.size and np.abs(a - b).max() <= 2  # int16 rounding of float differences only


def test_chunk_spans_grow_and_cover_the_piece():
    assert engine.chunk_spans(0) == []
    assert engine.chunk_spans(30) == [(0, 30)]  # shorter than two first chunks: one chunk, no stub
    first = engine.FIRST_FRAMES
    assert engine.chunk_spans(346) == [(0, first), (first, 3 * first), (3 * first, 7 * first), (7 * first, 346)]


def test_one_gain_per_sentence_from_the_voice_loudness(model):
    quiet, loud = np.full(10, 0.1, np.float32), np.full(10, 2 * model.peak, np.float32)
    assert engine._gain(model.peak, quiet) == pytest.approx(engine.PEAK / model.peak)
    assert engine._gain(model.peak, loud) == pytest.approx(engine.PEAK / (2 * model.peak))
    assert engine._gain(model.peak, np.zeros(0, np.float32)) == pytest.approx(engine.PEAK / model.peak)
