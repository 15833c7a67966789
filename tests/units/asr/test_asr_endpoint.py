"""Endpointing rules (spec §16.2) on synthetic chunk streams."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from units.asr.endpoint import EndpointConfig, EndpointRule, Endpointer, chunk_dbfs

CHUNK = 512  # 32 ms, silero's chunk
SECONDS_PER_CHUNK = CHUNK / 16000


def tone(n=CHUNK, amplitude=8000):
    return (amplitude * np.sin(np.arange(n) * 0.3)).astype(np.int16)


def silence(n=CHUNK):
    return np.zeros(n, dtype=np.int16)


def feed(ep, pattern):
    """pattern: (is_speech, n_chunks) pairs; returns [(chunk index, endpoint)] with VAD probabilities."""
    out, i = [], 0
    for speech, n in pattern:
        for _ in range(n):
            result = ep.push(tone() if speech else silence(), 0.9 if speech else 0.1)
            if result is not None:
                out.append((i, result))
            i += 1
    return out


def chunks_for(seconds):
    return int(np.ceil(seconds / SECONDS_PER_CHUNK - 1e-9))


@pytest.mark.parametrize("lead_chunks, kept_lead", [(10, 10 * CHUNK), (40, 13 * CHUNK)])
def test_rule2_ends_utterance_after_trailing_silence(lead_chunks, kept_lead):
    ep = Endpointer()
    hits = feed(ep, [(False, lead_chunks), (True, 30), (False, 60)])
    assert len(hits) == 1
    index, end = hits[0]
    assert end.rule == 2 and end.has_speech
    assert index == lead_chunks + 30 + chunks_for(1.2) - 1  # the first chunk that completes 1.2 s of silence
    # lead-in: whole chunks, at least keep_silence_s (0.4 s); tail: exactly 0.4 s; the speech is whole
    assert len(end.pcm) == kept_lead + 30 * CHUNK + 6400
    assert np.array_equal(end.pcm[kept_lead:kept_lead + 30 * CHUNK], np.concatenate([tone()] * 30))


def test_rule1_ends_turn_when_nothing_was_said():
    ep = Endpointer()
    hits = feed(ep, [(False, 200)])
    assert [index for index, _ in hits][0] == chunks_for(2.4) - 1
    end = hits[0][1]
    assert end.rule == 1 and not end.has_speech and len(end.pcm) == 0


def test_rule3_caps_utterance_length():
    ep = Endpointer(EndpointConfig.from_params({"rule3": 5}))
    hits = feed(ep, [(True, 400)])
    assert hits[0][0] == chunks_for(5.0) - 1 and hits[0][1].rule == 3
    assert len(hits[0][1].pcm) == chunks_for(5.0) * CHUNK
    assert len(hits) == 400 // chunks_for(5.0)  # the state resets after each endpoint


def test_short_pause_does_not_end_the_utterance():
    ep = Endpointer()
    hits = feed(ep, [(True, 20), (False, chunks_for(1.0)), (True, 20), (False, 50)])
    assert len(hits) == 1 and hits[0][1].rule == 2
    assert np.count_nonzero(hits[0][1].pcm) == 40 * np.count_nonzero(tone())


def test_flush_returns_pending_speech_only():
    ep = Endpointer()
    feed(ep, [(False, 5)])
    assert ep.flush() is None
    feed(ep, [(True, 5)])
    end = ep.flush()
    assert end is not None and end.rule == 0 and end.has_speech
    assert ep.flush() is None


def test_energy_vad_without_probabilities():
    ep = Endpointer()
    assert ep.is_speech(tone(), None) and not ep.is_speech(silence(), None)
    assert not ep.is_speech(tone(amplitude=100), None)  # about -50 dBFS: below -40
    assert chunk_dbfs(silence()) == -np.inf
    assert chunk_dbfs(np.full(100, 32767, dtype=np.int16)) == pytest.approx(0.0, abs=1e-3)
    hits = [ep.push(c) for c in [tone()] * 10 + [silence()] * 60]
    ends = [h for h in hits if h is not None]
    assert len(ends) == 1 and ends[0].rule == 2


def test_config_from_params_shortcuts_win():
    cfg = EndpointConfig.from_params({
        "endpoint_config.rule1.min_trailing_silence": 3.0,
        "endpoint_config.rule2.must_contain_nonsilence": False,
        "rule2": 0.8,
        "endpoint_config.rule2.min_trailing_silence": 1.5,
        "rule3": 12,
    })
    assert cfg.rule1 == EndpointRule(False, 3.0, 0.0)
    assert cfg.rule2 == EndpointRule(False, 0.8, 0.0)
    assert cfg.rule3 == EndpointRule(False, 0.0, 12.0)
    assert EndpointConfig.from_params({}) == EndpointConfig()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 120)), min_size=1, max_size=12))
def test_rules_hold_on_any_stream(pattern):
    ep = Endpointer()
    total = sum(n for _, n in pattern) * CHUNK
    covered = 0
    for _, end in feed(ep, pattern):
        covered += round(end.length * 16000)
        assert end.length <= 30.0 + SECONDS_PER_CHUNK
        if end.rule == 1:
            assert not end.has_speech and len(end.pcm) == 0
        if end.rule == 2:
            assert end.has_speech
        if end.has_speech:
            assert np.count_nonzero(end.pcm) > 0
    # every sample belongs to exactly one segment: ended ones plus the pending one
    assert covered + round(ep.length * 16000) == total
