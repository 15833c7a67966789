"""Boards as NATS leaf nodes of a hub cluster (protocol.md §21.2): each board serves its own nats-server,
which dials out to the hub; a leaf with the wrong credentials is refused."""
from __future__ import annotations

import time

import pytest

from fleet_support import NatsCluster, board, setup_llm, text_of, wait_joined
from support import StackFlowClient, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def leaf_board(tmp_path, name: str, hub: str, password: str, units=("llm",)):
    return board(tmp_path / name, name, "", units=units, **{
        "fleet.serve": "true", "fleet.listen": f"127.0.0.1:{free_port()}", "fleet.hub": hub,
        "fleet.leaf_password": password})


def test_boards_on_leaf_nodes_of_a_cluster(tmp_path):
    hub = NatsCluster(tmp_path, leaf_password="leaf-secret")
    stacks = []
    try:
        alpha = leaf_board(tmp_path, "alpha", hub.leaf_url, "leaf-secret").start(timeout=300)
        stacks.append(alpha)
        beta = leaf_board(tmp_path, "beta", hub.leaf_url, "leaf-secret").start(timeout=300)
        stacks.append(beta)
        wait_joined(alpha, "alpha", "beta")
        assert hub.leaf_nodes() == ["unitbus-alpha", "unitbus-beta"]  # each board's own server dialled out
        with StackFlowClient(alpha.port, timeout=120) as c:
            reply = setup_llm(c, "llm@beta")
            assert reply["error"]["code"] == 0 and reply["work_id"].endswith("@beta"), reply
            c.send({"request_id": "s", "work_id": reply["work_id"], "action": "inference",
                    "object": "llm.utf-8.stream", "data": {"delta": "Name a color.", "index": 0, "finish": True}})
            chunks = c.stream("s", timeout=120)
            assert all(m["error"]["code"] == 0 and m["work_id"] == reply["work_id"] for m in chunks), chunks
            assert chunks[-1]["data"]["finish"] is True and text_of(chunks).strip()
            assert c.request({"request_id": "x", "work_id": reply["work_id"], "action": "exit"})["error"]["code"] == 0
        intruder = leaf_board(tmp_path, "intruder", hub.leaf_url, "wrong", units=("skel",)).start()
        stacks.append(intruder)
        deadline = time.monotonic() + 30
        while "authorization violation" not in intruder.log().lower():
            assert time.monotonic() < deadline, intruder.log()[-3000:]
            time.sleep(0.2)
        assert hub.leaf_nodes() == ["unitbus-alpha", "unitbus-beta"]
        with StackFlowClient(alpha.port, timeout=10) as c:
            refused = c.request({"request_id": "p", "work_id": "sys@intruder", "action": "ping"})
            assert refused["error"]["code"] == -9 and "no board named intruder" in refused["error"]["message"], refused
            listing = c.request({"request_id": "l", "work_id": "sys", "action": "lsmode", "data": {"fleet": True}})
            assert set(listing["data"]) == {"alpha", "beta"}, listing
    finally:
        codes = [s.stop(check=False) for s in reversed(stacks)]
        hub.stop()
    assert codes == [0] * len(codes)
