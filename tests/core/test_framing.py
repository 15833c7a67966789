"""The framing scanner (spec §13): string-aware, RAW frames, limits; fuzzed with hypothesis."""
from __future__ import annotations

import json

from hypothesis import given, settings, strategies as st

from core.errors import ErrorCode
from core.envelope import is_request
from core.framing import Frame, Framer, FramingError, nested_requests


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


# Resynchronisation after garbage (spec §13.1 rule 7) ------------------------------------------------

def ping(n) -> bytes:
    return b'{"request_id":"%d","work_id":"sys","action":"ping"}' % n


def answered(events) -> list[bytes]:
    """The requests a connection dispatches: frames that are requests, else the requests nested in them."""
    out = []
    for e in events:
        if isinstance(e, Frame):
            out += [e.data] if is_request(e.data) else nested_requests(e.data)
    return out


def test_a_stray_open_brace_no_longer_swallows_the_next_request():
    out = Framer().feed(b"{x" + ping(1) + ping(2))
    assert frames(out) == [ping(1), ping(2)]
    assert [e.code for e in out if isinstance(e, FramingError)] == [ErrorCode.JSON_FORMAT]


def test_requests_nested_in_a_frame_that_breaks_are_answered_in_order():
    out = Framer().feed(b'{"a":[' + ping(1) + b"," + ping(2) + b"] x" + ping(3))
    assert frames(out) == [ping(1), ping(2), ping(3)]
    errors = [e for e in out if isinstance(e, FramingError)]
    assert [e.code for e in errors] == [ErrorCode.JSON_FORMAT] and "skipped to the next '{'" in errors[0].detail


def test_a_broken_frame_costs_one_error_and_its_own_close_is_not_a_stray_brace():
    f = Framer()
    out = f.feed(b"{a{b") + f.feed(b"c}}") + f.feed(b"}" + ping(1))
    assert [e.code for e in out if isinstance(e, FramingError)] == [ErrorCode.JSON_FORMAT, ErrorCode.JSON_FORMAT,
                                                                    ErrorCode.REACE_RESET]
    assert frames(out) == [ping(1)]


def test_a_valid_frame_around_requests_is_kept_whole_and_the_connection_finds_them():
    doc = b'{"a":\n' + ping(1) + b"}"  # valid JSON (a newline before {" included): one frame, as always
    out = Framer().feed(doc)
    assert frames(out) == [doc] and answered(out) == [ping(1)]


def test_an_idle_frame_with_a_nested_request_answers_it_when_dropped():
    now = [0.0]
    f = Framer(idle_reset_s=5, clock=lambda: now[0])
    assert f.feed(b'{"k":' + ping(1)) == []  # still valid JSON so far: nothing is decided yet
    now[0] = 6.0
    out = f.check_idle()
    assert [e.code for e in out if isinstance(e, FramingError)] == [ErrorCode.JSON_FORMAT]
    assert frames(out) == [ping(1)]


def test_binary_headers_in_garbage_resynchronise_and_keep_their_payload():
    payload = b"}{\x00"
    header = b'{"RAW":3,"request_id":"7","work_id":"asr.1001","action":"inference"}'
    out = Framer().feed(b"{x" + header + payload + ping(1))
    raws = [e for e in out if isinstance(e, Frame) and e.raw is not None]
    assert [r.raw for r in raws] == [payload] and frames(out)[-1] == ping(1)


def test_resync_parses_are_bounded_for_a_hostile_frame():
    hostile = b'{"a":' + b'{"action":"x","k":' * 5000 + b"1" + b"}" * 5000 + b" x"
    assert nested_requests(hostile[:-2]) == []  # 5000 candidates, at most MAX_RESYNC_PARSES parsed


safe_text = st.text(alphabet="ab 1.-", max_size=4)
garbage_piece = st.one_of(
    st.text(alphabet="{}[]:,ab1-.tru \n\t\r#", min_size=1, max_size=6),
    safe_text.map(lambda t: f'"{t}"'),  # whole strings only: garbage that opens no unterminated string
    st.sampled_from(['{"a":', '{"a":[', '"b":', ",", "}", "]", "1"]),  # prefixes a request can nest in
)
request_value = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 63 - 1)
                             | st.text(alphabet='ab{}[]:,"\\ é', max_size=6),
                             lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text("abc{}", max_size=3), c,
                                                                                 max_size=3), max_leaves=6)


@settings(max_examples=400)
@given(st.lists(st.tuples(st.lists(garbage_piece, max_size=4).map("".join), request_value), min_size=1, max_size=6),
       st.lists(garbage_piece, max_size=4).map("".join), st.data())
def test_every_request_interleaved_with_garbage_is_answered(pairs, tail, data):
    requests = [json.dumps({"request_id": str(n), "work_id": "sys", "action": "ping", "data": value},
                           ensure_ascii=False).encode() for n, (_, value) in enumerate(pairs)]
    stream = b"".join(g.encode() + r for (g, _), r in zip(pairs, requests)) + tail.encode()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    now = [0.0]
    f, events, last = Framer(clock=lambda: now[0]), [], 0
    for cut in cuts + [len(stream)]:
        events += f.feed(stream[last:cut])
        last = cut
    now[0] = 10.0
    events += f.check_idle()
    assert answered(events) == requests
