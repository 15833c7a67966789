"""The envelope codec: golden bytes of spec §4.3 and round trips of every message type."""
from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, strategies as st

from core import bus
from core.envelope import (EnvelopeError, Request, Response, canonical_json, decode_request, error_reply, reply,
                           request_of, stream_data)
from core.errors import ErrorCode, UnitError


def test_control_reply_golden_bytes():
    r = Response("2", "llm.1002", created=1735689600)
    assert r.encode() == (b'{"created":1735689600,"data":"None","error":{"code":0,"message":""},'
                          b'"object":"None","request_id":"2","work_id":"llm.1002"}\n')


def test_stream_chunk_golden_bytes_sorted_at_every_level():
    r = Response("5", "llm.1002", "llm.utf-8.stream", stream_data(0, "I am an", False), created=1735689601)
    assert r.encode() == (b'{"created":1735689601,"data":{"delta":"I am an","finish":false,"index":0},'
                          b'"error":{"code":0,"message":""},"object":"llm.utf-8.stream","request_id":"5",'
                          b'"work_id":"llm.1002"}\n')
    assert b'"finish":true' in Response("5", "x", data=stream_data(1, "", True)).encode()


def test_error_reply_golden_bytes():
    r = error_reply("19", "llm.1002", ErrorCode.QUEUE_FULL, "3 requests queued on llm.1002")
    r.created = 1735689600
    assert r.encode() == (b'{"created":1735689600,"data":"None","error":{"code":-32,"message":"inference queue full: '
                          b'3 requests queued on llm.1002"},"object":"None","request_id":"19","work_id":"llm.1002"}\n')


def test_text_escaping_rules():
    data = canonical_json({"t": "日本 é / \"q\" \\ \n\t\b\f\r \x01 \x1f"})
    assert data == '{"t":"日本 é / \\"q\\" \\\\ \\n\\t\\b\\f\\r \\u0001 \\u001f"}'.encode()
    assert canonical_json({"x": float("nan"), "y": [float("inf")], "z": 0.1}) == b'{"x":null,"y":[null],"z":0.1}'
    assert canonical_json({"s": "\ud800"}) == '{"s":"\ufffd"}'.encode()  # never invalid UTF-8


def test_escape_braces_keeps_the_value():
    raw = canonical_json({"data": "a {b} c", "n": {"k": 1}}, escape_braces=True)
    assert raw.count(b"{") == raw.count(b"}") == 2
    assert json.loads(raw) == {"data": "a {b} c", "n": {"k": 1}}


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
                    max_leaves=20))
def test_response_round_trip(data):
    r = Response("id", "llm.1000", "llm.utf-8", data, -11, "Model run failed.: x", 1700000000)
    raw = r.encode()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    assert Response.decode(raw) == r
    raw.decode("utf-8")


def test_decode_request_rules():
    req = decode_request(b'{"request_id":"1","work_id":"","action":"ping","extra":1}')
    assert (req.work_id, req.object, req.data) == ("sys", "None", "None")
    for frame, echo in [(b'{"request_id":18,"work_id":"sys","action":"ping"}', "0"),
                        (b'{"request_id":"r","work_id":"sys"}', "r"),
                        (b'[1,2]', "0"), (b'\xff{}', "0"), (b'{"a":', "0"),
                        (b'{"request_id":"r","work_id":3,"action":"x"}', "r")]:
        with pytest.raises(EnvelopeError) as info:
            decode_request(frame)
        assert info.value.request_id == echo and info.value.code == ErrorCode.JSON_FORMAT
    deep = b'{"request_id":"1","work_id":"sys","action":"ping","data":' + b"[" * 100000 + b"]" * 100000 + b"}"
    with pytest.raises(EnvelopeError):
        decode_request(deep)


def test_request_round_trip():
    req = Request("1", "llm.1002", "inference", "llm.utf-8", {"k": [1, "é"]}, token="t")
    assert decode_request(req.encode()) == req
    assert reply(req, data=[1], object="o").to_dict()["data"] == [1]


def test_unit_error_carries_stackflow_text():
    assert UnitError(ErrorCode.UNIT_NOT_EXIST).message == "Unit Does Not Exist"
    assert UnitError(ErrorCode.MODEL_LOADING, "no manifest").message == "Model loading failed: no manifest"
    assert ErrorCode.REACE_RESET.text == "reace reset"


EXAMPLES = {
    bus.Hello: dict(role="unit", name="llm", names=["llm"], actions=["setup"], version="1", features=["x"], pid=7),
    bus.Heartbeat: {},
    bus.Req: dict(tag=3, conn=4, request={"request_id": "1"}, route=[b"id", 3, 4], assigned="llm.1000",
                  ctx={"tasks": {}}, binary=b"\x00\x01"),
    bus.Msg: dict(response={"a": 1}, route=[b"c", 1, 2], owner=[b"c", 2], publish="llm.1000", final=True, tag=1,
                  conn=2, binary=b"pcm"),
    bus.Chain: dict(src="sys.pcm", dst=["kws.1000"], response=None, binary=b"\x01" * 640),
    bus.TaskEvent: dict(op="up", work_id="llm.1000", info={"k": 1}, subscribe=["kws.1001"]),
    bus.Gone: dict(client=b"\x00ab", conn=None),
    bus.Control: dict(op="uartsetup", data={"baud": 9600}),
}


def test_every_bus_message_type_round_trips():
    assert set(EXAMPLES) == set(bus.Message.registry.values())
    for cls, fields in EXAMPLES.items():
        message = cls(**fields)
        assert bus.Message.decode(message.encode()) == message
        assert dataclasses.is_dataclass(message)


@pytest.mark.parametrize("value, why", [
    (2 ** 63, "64-bit"), (-2 ** 63 - 1, "64-bit"), (10 ** 30, "64-bit"),
    (float("nan"), "NaN"), (float("inf"), "NaN"), (float("-inf"), "NaN"),
    ("a\ud800b", "surrogate in a string"), ({"\udfff": 1}, "surrogate in a key"),
    ([[[[1]]]] * 2 + [json.loads("[" * 70 + "]" * 70)], "nested deeper than 64"),
])
def test_values_the_bus_cannot_carry_are_refused_with_the_clients_ids(value, why):
    frame = json.dumps({"request_id": "r7", "work_id": "llm.1002", "action": "inference",
                        "data": {"x": [value]}}).encode()
    with pytest.raises(EnvelopeError) as info:
        decode_request(frame)
    assert (info.value.code, info.value.request_id, info.value.work_id) == (ErrorCode.JSON_FORMAT, "r7", "llm.1002")
    assert why in info.value.message
    reply_bytes = error_reply(info.value.request_id, info.value.work_id, info.value).encode()
    reply_bytes.decode("utf-8")  # the answer itself is valid UTF-8


@pytest.mark.parametrize("value, why", [
    (b"\x00", "bytes value"), ({1: "a"}, "key that is not a string"), (float("nan"), "NaN"), (2 ** 64, "64-bit"),
])
def test_a_request_decoded_by_msgpack_gets_the_checks_of_a_json_one(value, why):
    """Another board's request arrives as msgpack: what JSON cannot hold is refused too, with its ids."""
    with pytest.raises(EnvelopeError) as info:
        request_of({"request_id": "r7", "work_id": "sys", "action": "ping", "data": {"x": [value]}})
    assert (info.value.code, info.value.request_id) == (ErrorCode.JSON_FORMAT, "r7") and why in info.value.message
    with pytest.raises(EnvelopeError):
        request_of({"request_id": "r7", "work_id": 5, "action": "ping"})
    assert request_of({"request_id": "1", "work_id": "", "action": "ping"}) == Request("1", "sys", "ping")


def test_the_edges_of_what_the_bus_carries_pass_and_survive_msgpack():
    data = {"big": 2 ** 63 - 1, "small": -2 ** 63, "f": 1e308, "pair": "\U0001f600", "deep": json.loads("[" * 60 + "]" * 60)}
    req = decode_request(json.dumps({"request_id": "1", "work_id": "sys", "action": "x", "data": data}).encode())
    message = bus.Req(tag=1, conn=1, request=req.to_dict())
    assert bus.Message.decode(message.encode()).request["data"] == data
