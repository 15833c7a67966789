"""The stream assembler (core/streams.py) against spec §10.1 and §10.5, property-tested."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import ErrorCode, UnitError
from core.streams import StreamAssembler

CONNS = [(b"bridge", 1), (b"bridge", 2), (b"http", 1)]
TARGETS = ["asr.1001", "llm.1002"]
text = st.text(max_size=20)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def chunks_of(parts: list[str]) -> list[dict]:
    return [{"delta": p, "index": i, "finish": i == len(parts) - 1} for i, p in enumerate(parts)]


@given(st.lists(text, min_size=1, max_size=12))
def test_a_stream_in_order_is_joined_once_at_finish(parts):
    streams = StreamAssembler(1 << 20, 60.0)
    results = [streams.feed(CONNS[0], TARGETS[0], c) for c in chunks_of(parts)]
    assert results[:-1] == [None] * (len(parts) - 1)
    assert results[-1] == "".join(parts)
    assert len(streams) == 0


@given(st.lists(st.tuples(st.sampled_from(CONNS), st.sampled_from(TARGETS), st.lists(text, min_size=1, max_size=6)),
                min_size=1, max_size=6, unique_by=lambda s: (s[0], s[1])),
       st.randoms(use_true_random=False))
def test_interleaved_streams_of_other_connections_and_tasks_never_mix(streams_spec, rnd):
    streams = StreamAssembler(1 << 20, 60.0)
    queues = [[(conn, target, c) for c in chunks_of(parts)] for conn, target, parts in streams_spec]
    done: dict[tuple, str] = {}
    while any(queues):
        queue = rnd.choice([q for q in queues if q])
        conn, target, chunk = queue.pop(0)
        out = streams.feed(conn, target, chunk)
        if out is not None:
            done[(conn, target)] = out
    assert done == {(conn, target): "".join(parts) for conn, target, parts in streams_spec}
    assert len(streams) == 0


@given(st.lists(text, min_size=2, max_size=8), st.data())
def test_a_gap_or_repeat_is_minus_25_and_frees_the_buffer(parts, data):
    streams = StreamAssembler(1 << 20, 60.0)
    chunks = chunks_of(parts)
    cut = data.draw(st.integers(1, len(parts) - 1))
    for chunk in chunks[:cut]:
        assert streams.feed(CONNS[0], TARGETS[0], chunk) is None
    wrong = data.draw(st.integers(1, 50).filter(lambda i: i != cut))
    with pytest.raises(UnitError) as err:
        streams.feed(CONNS[0], TARGETS[0], {"delta": "x", "index": wrong, "finish": False})
    assert err.value.code == ErrorCode.STREAM_INDEX
    assert len(streams) == 0


@given(st.integers(0, 1000), text)
def test_a_lone_finish_chunk_is_accepted_whatever_its_index(index, delta):
    streams = StreamAssembler(1 << 20, 60.0)
    assert streams.feed(CONNS[0], TARGETS[0], {"delta": delta, "index": index, "finish": True}) == delta
    assert streams.feed(CONNS[0], TARGETS[0], {"delta": delta}) == delta  # a missing finish counts as true


@given(st.lists(text, min_size=1, max_size=5), st.lists(text, min_size=1, max_size=5))
def test_index_zero_starts_a_new_stream(abandoned, parts):
    streams = StreamAssembler(1 << 20, 60.0)
    for chunk in chunks_of(abandoned + ["tail"])[:-1]:
        streams.feed(CONNS[0], TARGETS[0], chunk)
    results = [streams.feed(CONNS[0], TARGETS[0], c) for c in chunks_of(parts)]
    assert results[-1] == "".join(parts)


@settings(max_examples=50)
@given(st.integers(1, 64), st.lists(st.text(min_size=1, max_size=16), min_size=1, max_size=40))
def test_buffers_never_exceed_the_bound(limit, parts):
    streams = StreamAssembler(limit, 60.0)
    total = 0
    for chunk in chunks_of(parts):
        total += len(chunk["delta"].encode())
        try:
            out = streams.feed(CONNS[0], TARGETS[0], chunk)
        except UnitError as exc:
            assert exc.code == ErrorCode.FRAME_TOO_LARGE and total > limit
            assert len(streams) == 0
            return
        assert streams.held_bytes <= limit
        if out is not None:
            assert total <= limit and out == "".join(parts)


def test_an_idle_stream_is_dropped_silently():
    clock = Clock()
    streams = StreamAssembler(1 << 20, 60.0, clock)
    streams.feed(CONNS[0], TARGETS[0], {"delta": "a", "index": 0, "finish": False})
    clock.now = 30.0
    streams.feed(CONNS[1], TARGETS[0], {"delta": "b", "index": 0, "finish": False})
    clock.now = 61.0
    streams.expire()
    assert len(streams) == 1  # only the first one was idle for more than 60 s
    with pytest.raises(UnitError) as err:  # its continuation has nothing to continue
        streams.feed(CONNS[0], TARGETS[0], {"delta": "c", "index": 1, "finish": False})
    assert err.value.code == ErrorCode.STREAM_INDEX
    assert streams.feed(CONNS[1], TARGETS[0], {"delta": "c", "index": 1, "finish": True}) == "bc"


@given(st.lists(st.tuples(st.sampled_from(CONNS), st.sampled_from(TARGETS)), min_size=1, max_size=10))
def test_drop_client_frees_every_buffer_of_that_client(open_streams):
    streams = StreamAssembler(1 << 20, 60.0)
    for conn, target in open_streams:
        streams.feed(conn, target, {"delta": "x" * 1000, "index": 0, "finish": False})
    streams.drop_client(b"bridge", 1)
    remaining = {k for k in set(open_streams) if k[0] != (b"bridge", 1)}
    assert len(streams) == len(remaining)
    streams.drop_client(b"bridge")
    assert len(streams) == len({k for k in remaining if k[0][0] != b"bridge"})
    streams.drop_client(b"http")
    assert len(streams) == 0 and streams.held_bytes == 0


def test_drop_target_frees_the_streams_of_an_exited_task():
    streams = StreamAssembler(1 << 20, 60.0)
    streams.feed(CONNS[0], "asr.1001", {"delta": "x", "index": 0, "finish": False})
    streams.feed(CONNS[0], "llm.1002", {"delta": "x", "index": 0, "finish": False})
    streams.drop_target("asr.1001")
    assert len(streams) == 1


junk = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                    max_leaves=8)


@given(st.lists(junk | st.fixed_dictionaries({"delta": junk, "index": junk}, optional={"finish": junk}), max_size=20))
def test_any_input_is_a_result_or_a_unit_error(chunks):
    streams = StreamAssembler(64, 60.0)
    for chunk in chunks:
        try:
            out = streams.feed(CONNS[0], TARGETS[0], chunk)
        except UnitError as exc:
            assert exc.code in (ErrorCode.JSON_FORMAT, ErrorCode.STREAM_INDEX, ErrorCode.FRAME_TOO_LARGE)
        else:
            assert out is None or isinstance(out, str)
        assert streams.held_bytes <= 64
