"""A NATS cluster of three servers; one is killed mid-stream (protocol.md §21.6)."""
from __future__ import annotations

import pytest

from fleet_support import NatsCluster, board, setup_llm, wait_joined
from support import StackFlowClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_a_nats_server_killed_mid_stream(tmp_path):
    cluster = NatsCluster(tmp_path)
    alpha = board(tmp_path / "alpha", "alpha", cluster.url).start(timeout=300)
    beta = board(tmp_path / "beta", "beta", cluster.url).start(timeout=300)
    try:
        wait_joined(alpha, "alpha", "beta")
        with StackFlowClient(alpha.port, timeout=60) as c:
            reply = setup_llm(c, "llm@beta", max_token_len=400)
            assert reply["error"]["code"] == 0, reply
            work_id = reply["work_id"]
            c.send({"request_id": "long", "work_id": work_id, "action": "inference", "object": "llm.utf-8.stream",
                    "data": {"delta": "Write a long story about a dragon.", "index": 0, "finish": True}})
            first = c.read_for("long")
            assert first["error"]["code"] == 0, first
            victim = cluster.server_of("unitbus-beta")
            cluster.procs[victim].kill()
            messages = [first] + c.stream("long", timeout=30)  # an answer, never a hang
            assert all(m["request_id"] == "long" and m["work_id"] == work_id for m in messages), messages
            chunks = [m for m in messages if m["error"]["code"] == 0]
            assert [m["data"]["index"] for m in chunks] == list(range(len(chunks)))  # nothing lost unseen
            end = messages[-1]
            assert end["data"] == {"delta": "", "finish": True, "index": len(chunks) - 1} if end["error"]["code"] == 0 \
                else end["error"]["code"] == -9, end
        wait_joined(alpha, "alpha", "beta")  # both bridges are on the servers left
        with StackFlowClient(alpha.port, timeout=60) as c:
            assert c.request({"request_id": "p", "work_id": "sys@beta", "action": "ping"})["error"]["code"] == 0
            c.send({"request_id": "again", "work_id": work_id, "action": "inference", "object": "llm.utf-8",
                    "data": "Name a color."})
            again = c.stream("again")
            assert again[-1]["error"]["code"] == 0 and again[-1]["data"]["finish"] is True, again
    finally:
        codes = [beta.stop(check=False), alpha.stop(check=False)]
        cluster.stop()
    assert codes == [0, 0]
