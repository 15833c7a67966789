"""Boards that vanish: requests in flight are answered, load-balanced ones move on, the board rejoins (§21.6)."""
from __future__ import annotations

import os
import signal

import pytest

from fleet_support import MODEL, pid_of_module, setup_llm, text_of, wait_joined
from support import StackFlowClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

HANDOVER_TRIES = 40


def test_board_killed_mid_stream_is_answered_and_rejoins(two_boards):
    a, b = two_boards
    with StackFlowClient(a.port, timeout=60) as c:
        reply = setup_llm(c, "llm@beta", max_token_len=1000)
        assert reply["error"]["code"] == 0, reply
        work_id = reply["work_id"]
        c.send({"request_id": "long", "work_id": work_id, "action": "inference", "object": "llm.utf-8.stream",
                "data": {"delta": "Write a very long story about a dragon.", "index": 0, "finish": True}})
        first = c.read_for("long")
        assert first["error"]["code"] == 0 and first["data"]["finish"] is False, first
        os.kill(pid_of_module(b, "firmware_bridge.fleet"), signal.SIGKILL)
        rest = c.stream("long", timeout=30)
        last = rest[-1]
        assert last["error"]["code"] == -9 and "board beta stopped answering" in last["error"]["message"], last
        assert last["work_id"] == work_id
        assert all(m["error"]["code"] == 0 and m["data"]["finish"] is False for m in rest[:-1])
    wait_joined(a, "alpha", "beta")  # beta's supervisor restarted its bridge, which joined again on its own
    with StackFlowClient(a.port, timeout=60) as c:
        reply = setup_llm(c, "llm@beta")
        assert reply["error"]["code"] == 0, reply
        c.send({"request_id": "again", "work_id": reply["work_id"], "action": "inference", "object": "llm.utf-8",
                "data": "Name a color."})
        assert text_of(c.stream("again")).strip()
        c.request({"request_id": "x", "work_id": reply["work_id"], "action": "exit"})


def test_frozen_board_hands_its_unstarted_requests_to_another(two_boards):
    """beta stops answering without closing its connection (a power cut): a load-balanced request that
    NATS gave to beta waits fleet.liveness_s without a word and is then offered again; alpha runs it."""
    a, b = two_boards
    fleet_pid = pid_of_module(b, "firmware_bridge.fleet")
    marks = len(a.output)
    os.kill(fleet_pid, signal.SIGSTOP)
    try:
        with StackFlowClient(a.port, timeout=60) as c:
            # NATS gives each request to one of the two boards at random: ask until one went to beta first
            # (each does with probability 1/2; HANDOVER_TRIES all to alpha: 2**-40). Every one runs on alpha.
            for n in range(HANDOVER_TRIES):
                c.send({"request_id": f"lb{n}", "work_id": "llm@*", "action": "inference", "object": "llm.utf-8",
                        "data": {"model": MODEL, "input": "Name a color.", "setup": {"max_token_len": 8}}})
                chunks = c.stream(f"lb{n}")
                assert all(m["error"]["code"] == 0 for m in chunks), chunks
                assert chunks[0]["work_id"].endswith("@alpha"), chunks
                if "handing it to another board" in "".join(a.output[marks:]):
                    break
    finally:
        os.kill(fleet_pid, signal.SIGCONT)
    assert "handing it to another board" in "".join(a.output[marks:]), "".join(a.output[marks:])[-3000:]
    wait_joined(a, "alpha", "beta")
