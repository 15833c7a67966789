from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vadaudio import SAMPLE_RATE, scene
from units.vad.engine import VadEvent, load_vad


def segments(events: list[VadEvent]) -> list[tuple[float, float]]:
    """Pair onset and end events; fails if they do not alternate."""
    assert [e.speech for e in events] == [True, False] * (len(events) // 2), events
    return [(events[i].seconds, events[i + 1].seconds) for i in range(0, len(events), 2)]


def run(model, pcm, **kw) -> list[VadEvent]:
    seg = model.segmenter(**kw)
    return seg.feed(pcm) + seg.flush()


def test_manifest_and_window_size(vad_params):
    manifest = json.loads((Path(__file__).resolve().parents[3] / "models" / "mode_silero-vad.json").read_text())
    assert manifest["type"] == "vad" and manifest["output_type"] == ["vad.bool"]
    for key in ("silero_vad.threshold", "silero_vad.min_silence_duration", "silero_vad.min_speech_duration",
                "silero_vad.window_size"):
        assert key in vad_params
    with pytest.raises(ValueError, match="512"):
        load_vad({**vad_params, "silero_vad.window_size": 256})


def test_segments_match_placed_speech(vad_model, vad_params, speech_scene):
    pcm, spans = speech_scene
    events = run(vad_model, pcm, threshold=vad_params["silero_vad.threshold"],
                 min_speech_s=vad_params["silero_vad.min_speech_duration"],
                 min_silence_s=vad_params["silero_vad.min_silence_duration"])
    found = segments(events)
    assert len(found) == len(spans), (found, spans)
    for (start, end), (true_start, true_end) in zip(found, spans):
        assert abs(start - true_start) <= 0.2, (start, true_start)
        assert abs(end - true_end) <= 0.2, (end, true_end)


def test_events_arrive_in_stream_order_and_chunking_does_not_matter(vad_model, speech_scene):
    pcm, _ = speech_scene
    expected = run(vad_model, pcm)
    seg = vad_model.segmenter()
    rng = np.random.default_rng(2)
    got, pos = [], 0
    while pos < len(pcm):
        n = int(rng.choice([1, 100, 511, 512, 513, 1600, 7000]))
        new = seg.feed(pcm[pos:pos + n])
        pos += n
        for e in new:
            # An onset is reported at most min_speech + one window after it, an end min_silence + one window.
            lag = (pos - e.sample) / SAMPLE_RATE
            assert 0 <= lag <= (0.25 if e.speech else 0.5) + 2 * 512 / SAMPLE_RATE + n / SAMPLE_RATE
        got += new
    got += seg.flush()
    assert got == expected


def test_silent_on_noise_and_hum(vad_model):
    rng = np.random.default_rng(4)
    t = np.arange(10 * SAMPLE_RATE) / SAMPLE_RATE
    white = rng.normal(0, 2000, t.size)
    hum = 6000 * np.sin(2 * np.pi * 50 * t) + 1500 * np.sin(2 * np.pi * 150 * t)
    for audio in (white, hum, np.zeros(t.size)):
        pcm = np.clip(audio, -32768, 32767).astype(np.int16)
        assert run(vad_model, pcm) == []
        assert vad_model.probabilities(pcm).max() < 0.5


def test_min_speech_suppresses_short_segments(vad_model, phrases):
    pcm, spans = scene(phrases[:1], [1.0], np.random.default_rng(6))
    assert len(segments(run(vad_model, pcm))) == 1
    longer = spans[0][1] - spans[0][0] + 0.5
    assert run(vad_model, pcm, min_speech_s=longer) == []


def test_min_silence_merges_close_phrases(vad_model, phrases):
    pcm, spans = scene(phrases[:2], [1.0, 0.3], np.random.default_rng(8))
    assert len(segments(run(vad_model, pcm, min_silence_s=0.8))) == 1
    assert len(segments(run(vad_model, pcm, min_silence_s=0.1))) == 2


def test_flush_closes_an_open_segment_and_resets(vad_model, phrases):
    pcm, _ = scene(phrases[:1], [0.5], np.random.default_rng(9))
    speech_only = pcm[: int(0.5 * SAMPLE_RATE) + phrases[0].size]
    seg = vad_model.segmenter()
    events = seg.feed(speech_only)
    assert [e.speech for e in events] == [True] and seg.in_speech
    closing = seg.flush()
    assert [e.speech for e in closing] == [False]
    assert closing[0].sample <= speech_only.size
    assert not seg.in_speech
    # after flush the clock starts again at zero
    assert seg.feed(speech_only)[0].sample == events[0].sample


def test_rejects_non_int16(vad_model):
    with pytest.raises(TypeError):
        vad_model.segmenter().feed(np.zeros(512, np.float32))
