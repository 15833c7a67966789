"""StackFlow over TCP against a real stack (sys, bridge, skel unit): spec §4-§10, §13, §15."""
from __future__ import annotations

import base64
import json
import re
import time

import pytest

from support import StackFlowClient

pytestmark = pytest.mark.e2e

CANONICAL = re.compile(rb'^\{"created":\d+,"data":.*,"error":\{"code":-?\d+,"message":".*"\},'
                       rb'"object":".*","request_id":".*","work_id":".*"\}\n$')


def setup_skel(client, request_id="s", **data):
    body = {"model": "skel-upper", "response_format": "skel.utf-8.stream", "input": "skel.utf-8", "enoutput": True}
    body.update(data)
    reply = client.request({"request_id": request_id, "work_id": "skel", "action": "setup",
                            "object": "skel.setup", "data": body})
    assert reply["error"] == {"code": 0, "message": ""}, reply
    return reply["work_id"]


def test_ping_bytes_are_stackflow_canonical(skel_stack):
    with StackFlowClient(skel_stack.port) as c:
        c.send(b'{"request_id":"sys_ping","work_id":"sys","action":"ping","object":"None","data":"None"}')
        line = c.read_line()
    assert CANONICAL.match(line), line
    created = json.loads(line)["created"]
    assert abs(created - time.time()) < 5  # seconds, not milliseconds
    assert line == (b'{"created":%d,"data":"None","error":{"code":0,"message":""},"object":"None",'
                    b'"request_id":"sys_ping","work_id":"sys"}\n' % created)


def test_setup_inference_stream_and_exit(skel_stack):
    with StackFlowClient(skel_stack.port) as c:
        work_id = setup_skel(c)
        assert work_id == "skel.1000"  # one counter from 1000 (spec §5.2)
        c.send({"request_id": "i1", "work_id": work_id, "action": "inference", "object": "skel.utf-8",
                "data": "héllo {wörld} 日本"})
        chunks = c.stream("i1")
        assert [m["data"]["index"] for m in chunks] == list(range(len(chunks)))
        assert chunks[-1]["data"] == {"delta": "", "finish": True, "index": len(chunks) - 1}
        assert "".join(m["data"]["delta"] for m in chunks) == "HÉLLO {WÖRLD} 日本"
        assert all(m["object"] == "skel.utf-8.stream" and m["work_id"] == work_id for m in chunks)
        assert "日本".encode() in b"".join(c.raw_lines)  # raw UTF-8, never \\u escapes
        info = c.request({"request_id": "t", "work_id": work_id, "action": "taskinfo"})
        assert info["object"] == "skel.taskinfo"
        assert {k: info["data"][k] for k in ("enoutput", "inputs", "model", "response_format")} == {
            "enoutput": True, "inputs": ["skel.utf-8"], "model": "skel-upper", "response_format": "skel.utf-8.stream"}
        tasks = c.request({"request_id": "l", "work_id": "sys", "action": "lstask"})
        assert [t["work_id"] for t in tasks["data"]] == [work_id]
        procs = c.request({"request_id": "lu", "work_id": "sys", "action": "lsunit"})
        assert procs["object"] == "sys.lsunit"
        assert [(u["unit"], u["pid"], u["tasks"]) for u in procs["data"]] == [("skel", skel_stack.pid_of("skel"), 1)]
        units = c.request({"request_id": "u", "work_id": "skel", "action": "taskinfo"})
        assert units["data"] == [work_id] and units["object"] == "skel.tasklist"
        bye = c.request({"request_id": "x", "work_id": work_id, "action": "exit"})
        assert bye["error"]["code"] == 0
        again = c.request({"request_id": "x2", "work_id": work_id, "action": "exit"})
        assert again["error"] == {"code": -6, "message": "Unit Does Not Exist"}
        after = c.request({"request_id": "i2", "work_id": work_id, "action": "inference", "object": "skel.utf-8", "data": "x"})
        assert after["error"]["code"] == -4
        assert c.request({"request_id": "l2", "work_id": "sys", "action": "lstask"})["data"] == []


def test_non_stream_output_and_streamed_input(skel_stack):
    with StackFlowClient(skel_stack.port) as c:
        work_id = setup_skel(c, response_format="skel.utf-8", mode="reverse")
        c.send({"request_id": "p1", "work_id": work_id, "action": "inference", "object": "skel.utf-8.stream",
                "data": {"delta": "ab", "index": 0, "finish": False}})
        c.send({"request_id": "p1", "work_id": work_id, "action": "inference", "object": "skel.utf-8.stream",
                "data": {"delta": "cd", "index": 1}})  # a missing finish counts as final (spec §10.5)
        reply = c.read_for("p1")
        assert reply["data"] == "dcba" and reply["object"] == "skel.utf-8"
        # A gap in the indexes is -25 and drops the buffer.
        c.send({"request_id": "p2", "work_id": work_id, "action": "inference", "object": "skel.utf-8.stream",
                "data": {"delta": "ab", "index": 0, "finish": False}})
        c.send({"request_id": "p2", "work_id": work_id, "action": "inference", "object": "skel.utf-8.stream",
                "data": {"delta": "cd", "index": 2, "finish": True}})
        gap = c.read_for("p2")
        assert gap["error"]["code"] == -25 and gap["work_id"] == work_id
        # A lone finish chunk is accepted whatever its index (the Arduino library sends index 1).
        c.send({"request_id": "p3", "work_id": work_id, "action": "inference", "object": "skel.utf-8.stream",
                "data": {"delta": "xy", "index": 1, "finish": True}})
        assert c.read_for("p3")["data"] == "yx"
        empty = c.request({"request_id": "p4", "work_id": work_id, "action": "inference", "object": "skel.utf-8", "data": ""})
        assert empty["error"]["code"] == -24
        bad64 = c.request({"request_id": "p5", "work_id": work_id, "action": "inference", "object": "skel.base64",
                           "data": "%%%not base64"})
        assert bad64["error"]["code"] == -23


def test_dispatch_errors_of_spec_section_6(skel_stack):
    with StackFlowClient(skel_stack.port) as c:
        cases = [
            ({"request_id": "17", "work_id": "sys", "action": "lsmod"}, -3, "sys"),
            ({"request_id": "18", "work_id": "camera", "action": "setup", "data": {"model": "x"}}, -9, "camera"),
            ({"request_id": "19", "work_id": "skel", "action": "resume"}, -18, "skel"),
            ({"request_id": "20", "work_id": "skel.1999", "action": "pause"}, -6, "skel.1999"),
            ({"request_id": "21", "work_id": "skel.1999", "action": "inference", "data": "x"}, -4, "skel.1999"),
            ({"request_id": "22", "work_id": "sys", "action": "bashexec", "data": "id"}, -30, "sys"),
            ({"request_id": "23", "work_id": "skel", "action": "setup", "data": {"model": "no-such-model"}}, -5, "skel"),
            ({"request_id": "24", "work_id": "skel", "action": "setup", "data": "None"}, -2, "skel"),
            ({"request_id": "25", "work_id": "skel", "action": "setup", "data": {"model": "skel", "delay_ms": "x"}}, -2, "skel"),
            ({"request_id": "26", "work_id": "skel", "action": "setup", "data": {"model": "skel", "input": "bogus.utf-8"}}, -22, "skel"),
            ({"request_id": "27", "work_id": "skel", "action": "setup", "data": {"model": "skel", "input": ["skel.1500"]}}, -20, "skel"),
        ]
        for message, code, work_id in cases:
            reply = c.request(message)
            assert reply["error"]["code"] == code, (message, reply)
            assert reply["work_id"] == work_id and reply["data"] == "None" and reply["object"] == "None"
        assert "sys.bashexec is off" in c.request(cases[5][0])["error"]["message"]
        # The five failed setups that reached the unit consumed 1000-1004 (spec §5.2).
        assert setup_skel(c) == "skel.1005"


def test_malformed_frames_keep_the_connection_usable(skel_stack):
    with StackFlowClient(skel_stack.port) as c:
        c.send(b'{"request_id":18,"work_id":"sys","action":"ping"}')
        bad = c.read()
        assert bad["error"]["code"] == -2 and bad["request_id"] == "0" and bad["work_id"] == "sys"
        c.send(b'{"request_id":"r1","work_id":"sys"}')
        missing = c.read()
        assert missing["error"]["code"] == -2 and missing["request_id"] == "r1"  # echoed when a string
        c.send(b'{not json at all}')
        assert c.read()["error"]["code"] == -2
        c.send(b'}')
        assert c.read()["error"] == {"code": -1, "message": "reace reset"}
        c.send(b'{"request_id":"b","work_id":"sys","action":"ping","data":"\xff\xfe"}')
        assert c.read()["error"]["code"] == -2
        c.send(b'garbage before {"request_id":"ok","work_id":"","action":"ping"} and after')
        ok = c.read()
        assert ok["error"]["code"] == 0 and ok["request_id"] == "ok"
        c.send(b'{"RAW":4,"request_id":"bon","work_id":"sys","action":"ping"}abcd{"request_id":"after","work_id":"sys","action":"ping"}')
        assert c.read()["request_id"] == "bon"
        assert c.read()["request_id"] == "after"


def test_frame_over_the_limit_is_answered_and_skipped(stack_factory):
    stack = stack_factory(["skel"], {"framing.max_frame_bytes": "4096"})
    with StackFlowClient(stack.port) as c:
        big = b'{"request_id":"big","work_id":"sys","action":"ping","data":"' + b"x" * 100_000 + b'"}'
        c.send(big + b'{"request_id":"next","work_id":"sys","action":"ping"}')
        first = c.read()
        assert first["error"]["code"] == -34
        assert c.read()["request_id"] == "next"


def test_pause_stops_the_stream_before_its_reply(skel_stack):
    with StackFlowClient(skel_stack.port) as c:
        work_id = setup_skel(c, delay_ms=100)
        c.send({"request_id": "long", "work_id": work_id, "action": "inference", "object": "skel.utf-8",
                "data": " ".join(["word"] * 200)})
        first = c.read_for("long")
        assert first["data"]["finish"] is False
        c.send({"request_id": "stop", "work_id": work_id, "action": "pause"})
        order = []
        while True:
            m = c.read()
            order.append((m["request_id"], m["data"]))
            if m["request_id"] == "stop":
                break
        finals = [i for i, (rid, data) in enumerate(order) if rid == "long" and data.get("finish")]
        assert finals and finals[0] == len(order) - 2, order[-3:]  # finish:true, then the pause reply
        assert len(order) < 50  # it really stopped
        # The task still works after a pause.
        c.send({"request_id": "again", "work_id": work_id, "action": "inference", "object": "skel.utf-8", "data": "ok"})
        assert "".join(m["data"]["delta"] for m in c.stream("again")) == "OK"


def test_link_passes_outputs_downstream_to_the_owner(skel_stack):
    with StackFlowClient(skel_stack.port) as c:
        upstream = setup_skel(c, "u", response_format="skel.utf-8", mode="upper")
        downstream = setup_skel(c, "d", response_format="skel.utf-8", mode="reverse", input=["skel.utf-8", upstream])
        info = c.request({"request_id": "ti", "work_id": downstream, "action": "taskinfo"})["data"]
        assert info["inputs"] == ["skel.utf-8", upstream]
        c.send({"request_id": "go", "work_id": upstream, "action": "inference", "object": "skel.utf-8", "data": "abc"})
        got = {(m["work_id"], m["data"]) for m in (c.read(), c.read())}
        # The downstream chain output carries its last accepted request_id: its setup's ("d").
        assert got == {(upstream, "ABC"), (downstream, "CBA")}
        unlink = c.request({"request_id": "ul", "work_id": downstream, "action": "unlink", "object": "work_id", "data": upstream})
        assert unlink["error"]["code"] == 0
        c.send({"request_id": "go2", "work_id": upstream, "action": "inference", "object": "skel.utf-8", "data": "q"})
        assert c.read()["data"] == "Q"
        c.expect_silence(0.5)
        relink = c.request({"request_id": "rl", "work_id": downstream, "action": "link", "object": "work_id", "data": upstream})
        assert relink["error"]["code"] == 0
        self_link = c.request({"request_id": "sl", "work_id": downstream, "action": "link", "object": "work_id", "data": downstream})
        assert self_link["error"]["code"] == -22
        missing = c.request({"request_id": "ml", "work_id": downstream, "action": "link", "object": "work_id", "data": "skel.1999"})
        assert missing["error"]["code"] == -20
        c.request({"request_id": "ex", "work_id": upstream, "action": "exit"})
        info = c.request({"request_id": "ti2", "work_id": downstream, "action": "taskinfo"})["data"]
        assert info["inputs"] == ["skel.utf-8"]  # an exited upstream leaves downstream inputs


def test_task_full_and_queue_full(stack_factory):
    stack = stack_factory(["skel"], {"skel.max_tasks": "1"})
    with StackFlowClient(stack.port) as c:
        work_id = setup_skel(c, delay_ms=50, max_queue=2)
        full = c.request({"request_id": "f", "work_id": "skel", "action": "setup", "data": {"model": "skel"}})
        assert full["error"]["code"] == -21 and full["error"]["message"].startswith("task full")
        assert work_id in full["error"]["message"]  # the -21 names the task that holds the slot
        for n in range(4):
            c.send({"request_id": f"q{n}", "work_id": work_id, "action": "inference", "object": "skel.utf-8",
                    "data": "a b c d e f"})
        refused = c.read_for("q3")
        assert refused["error"]["code"] == -32 and "queued" in refused["error"]["message"]
        for n in range(3):
            assert c.stream(f"q{n}")[-1]["data"]["finish"] is True


def test_raw_binary_frame_is_data_as_base64(skel_stack):
    with StackFlowClient(skel_stack.port) as c:
        work_id = setup_skel(c, response_format="skel.utf-8")
        payload = "raw text".encode()
        c.send(b'{"RAW":%d,"request_id":"raw","work_id":"%s","action":"inference","object":"skel.base64"}' % (
            len(payload), work_id.encode()) + payload)
        assert c.read_for("raw")["error"]["code"] == -2  # skel takes text; bytes are refused, not crashed on
        c.send({"request_id": "b64", "work_id": work_id, "action": "inference", "object": "skel.utf-8",
                "data": base64.b64encode(b"x").decode()})
        assert c.read_for("b64")["data"] == "EA=="


def test_many_connections_each_get_only_their_own_replies(skel_stack):
    clients = [StackFlowClient(skel_stack.port) for _ in range(3)]
    try:
        work_id = setup_skel(clients[0], response_format="skel.utf-8")
        for n, c in enumerate(clients):
            c.send({"request_id": "same", "work_id": work_id, "action": "inference", "object": "skel.utf-8",
                    "data": f"client {n}"})
        for n, c in enumerate(clients):
            assert c.read_for("same")["data"] == f"CLIENT {n}"
            c.expect_silence(0.3)
    finally:
        for c in clients:
            c.close()
