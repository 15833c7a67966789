"""The framing scanner (spec §13): string-aware, RAW frames, limits; fuzzed with hypothesis."""
from __future__ import annotations

import json

from hypothesis import given, settings, strategies as st

from core.errors import ErrorCode
from core.framing import Frame, Framer, FramingError


def frames(events):
    return [e.data for e in events if isinstance(e, Frame)]


def test_frames_need_no_newline_and_ignore_junk():
    f = Framer()
    out = f.feed(b'junk {"a":1}{"b":"x"}\n\n  {"c":[{}]}')
    assert frames(out) == [b'{"a":1}', b'{"b":"x"}', b'{"c":[{}]}']


def test_braces_and_escaped_quotes_inside_strings():
    f = Framer()
    doc = b'{"data":"a { b \\" } c","k":"}}}"}'
    assert frames(f.feed(doc)) == [doc]


def test_stray_close_brace_is_reported_once_per_chunk():
    out = Framer().feed(b'}}}{"a":1}')
    errors = [e for e in out if isinstance(e, FramingError)]
    assert len(errors) == 1 and errors[0].code == ErrorCode.REACE_RESET
    assert frames(out) == [b'{"a":1}']


def test_newline_inside_a_string_resynchronises():
    out = Framer().feed(b'{"a":"lost quote\n{"b":2}')
    assert [e.code for e in out if isinstance(e, FramingError)] == [ErrorCode.JSON_FORMAT]
    assert frames(out) == [b'{"b":2}']


def test_raw_frame_carries_binary_and_is_not_scanned():
    payload = b'}{"\n\x00\xff' * 10
    header = b'{"RAW":%d,"request_id":"7","work_id":"asr.1001","action":"inference","object":"asr.pcm.base64"}' % len(payload)
    f = Framer()
    out = []
    for byte in header + payload + b'{"n":1}':
        out += f.feed(bytes([byte]))
    assert isinstance(out[0], Frame) and out[0].raw == payload
    assert json.loads(out[0].data) == {"request_id": "7", "work_id": "asr.1001", "action": "inference",
                                       "object": "asr.pcm.base64"}
    assert frames(out[1:]) == [b'{"n":1}']


def test_oversized_frame_and_raw_are_answered_and_skipped():
    f = Framer(max_frame_bytes=100, max_raw_bytes=10)
    big = b'{"x":"' + b"{" * 1000 + b'"}'
    out = f.feed(big + b'{"ok":1}')
    assert [e.code for e in out if isinstance(e, FramingError)] == [ErrorCode.FRAME_TOO_LARGE]
    assert frames(out) == [b'{"ok":1}']
    assert len(f._buf) < 200  # memory stays bounded while skipping
    out = f.feed(b'{"RAW":50,"request_id":"r"}' + b"x" * 50 + b'{"ok":2}')
    assert [(e.code, e.request_id) for e in out if isinstance(e, FramingError)] == [(ErrorCode.FRAME_TOO_LARGE, "r")]
    assert frames(out) == [b'{"ok":2}']


def test_bson_frames_are_refused_and_skipped():
    out = Framer().feed(b'{"BON":3}abc{"ok":1}')
    assert out[0].code == ErrorCode.JSON_FORMAT and "BSON" in out[0].detail
    assert frames(out) == [b'{"ok":1}']


def test_idle_partial_frame_is_dropped():
    now = [0.0]
    f = Framer(idle_reset_s=5, clock=lambda: now[0])
    f.feed(b'{"a":')
    now[0] = 4.0
    assert f.check_idle() == []
    now[0] = 9.5
    assert [e.code for e in f.check_idle()] == [ErrorCode.JSON_FORMAT]
    assert frames(f.feed(b'{"b":1}')) == [b'{"b":1}']


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet=st.characters(codec="utf-8"), max_size=20),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=10)


@settings(max_examples=200)
@given(st.lists(st.dictionaries(st.text(max_size=8), json_values, min_size=1, max_size=4), min_size=1, max_size=5),
       st.data())
def test_any_split_of_valid_frames_gives_the_same_frames(docs, data):
    stream = b"".join(json.dumps(d, ensure_ascii=False).encode() for d in docs if next(iter(d)) not in ("RAW", "BON"))
    expected = frames(Framer().feed(stream))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    f, got, last = Framer(), [], 0
    for cut in cuts + [len(stream)]:
        got += frames(f.feed(stream[last:cut]))
        last = cut
    assert got == expected
    assert [json.loads(g) for g in got] == [d for d in docs if next(iter(d)) not in ("RAW", "BON")]


@settings(max_examples=300)
@given(st.binary(max_size=400), st.integers(1, 64))
def test_random_bytes_never_raise(blob, step):
    f = Framer(max_frame_bytes=128, max_raw_bytes=64)
    for i in range(0, len(blob), step):
        for event in f.feed(blob[i:i + step]):
            assert isinstance(event, (Frame, FramingError))
            if isinstance(event, Frame):
                assert len(event.data) <= 128
    assert len(f._buf) <= 128
    f.check_idle()
