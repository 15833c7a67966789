"""A StackFlow client of one board uses the llm of another (protocol.md §21.1)."""
from __future__ import annotations

import pytest

from fleet_support import LLM_SETUP, TOKEN, setup_llm, text_of
from support import StackFlowClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

QUESTION = "Name a color."


def ask(c: StackFlowClient, work_id: str, request_id: str) -> list[dict]:
    c.send({"request_id": request_id, "work_id": work_id, "action": "inference", "object": "llm.utf-8.stream",
            "data": {"delta": QUESTION, "index": 0, "finish": True}})
    return c.stream(request_id, timeout=120)


def test_setup_stream_taskinfo_exit_on_another_board(two_boards):
    a, b = two_boards
    with StackFlowClient(b.port, timeout=120) as local:
        reply = setup_llm(local, "llm")
        assert reply["error"]["code"] == 0, reply
        expected = text_of(ask(local, reply["work_id"], "here"))
        local.request({"request_id": "x", "work_id": reply["work_id"], "action": "exit"})
    with StackFlowClient(a.port, timeout=120) as c:
        reply = setup_llm(c, "llm@beta")
        assert reply["error"]["code"] == 0, reply
        work_id = reply["work_id"]
        assert work_id.startswith("llm.") and work_id.endswith("@beta"), work_id
        chunks = ask(c, work_id, "there")
        assert all(m["work_id"] == work_id and m["error"]["code"] == 0 for m in chunks), chunks
        assert [m["data"]["index"] for m in chunks] == list(range(len(chunks)))
        assert chunks[-1]["data"]["finish"] is True and len(chunks) > 2
        assert text_of(chunks) == expected  # greedy: the same answer as a client of beta itself gets
        info = c.request({"request_id": "ti", "work_id": work_id, "action": "taskinfo"})
        assert info["error"]["code"] == 0 and info["data"]["model"] == LLM_SETUP["model"], info
        listing = c.request({"request_id": "ls", "work_id": "sys", "action": "lstask", "data": {"fleet": True}})
        assert work_id in [t["work_id"] for t in listing["data"]["beta"]], listing
        assert c.request({"request_id": "x", "work_id": work_id, "action": "exit"})["error"]["code"] == 0
        gone = c.request({"request_id": "ti2", "work_id": work_id, "action": "taskinfo"})
        assert gone["error"]["code"] == -6 and gone["work_id"] == work_id, gone


def test_unknown_board_and_bad_names_answered_at_once(two_boards):
    a, _ = two_boards
    with StackFlowClient(a.port, timeout=10) as c:
        reply = c.request({"request_id": "u", "work_id": "llm@gamma", "action": "setup", "data": LLM_SETUP})
        assert reply["error"]["code"] == -9 and "no board named gamma" in reply["error"]["message"], reply
        assert reply["work_id"] == "llm@gamma"
        reply = c.request({"request_id": "b", "work_id": "llm@no such board", "action": "setup", "data": LLM_SETUP})
        assert reply["error"]["code"] == -9 and "board name" in reply["error"]["message"], reply
        reply = c.request({"request_id": "n", "work_id": "nosuchunit@beta", "action": "setup", "data": {}})
        assert reply["error"]["code"] == -9 and reply["work_id"] == "nosuchunit@beta", reply
        assert c.request({"request_id": "p", "work_id": "sys@beta", "action": "ping"})["error"]["code"] == 0


def test_fleet_wide_listings(two_boards):
    a, _ = two_boards
    with StackFlowClient(a.port, timeout=30) as c:
        modes = c.request({"request_id": "m", "work_id": "sys", "action": "lsmode", "data": {"fleet": True}})
        assert modes["object"] == "sys.lsmode" and set(modes["data"]) == {"alpha", "beta"}
        assert any(m["mode"] == LLM_SETUP["model"] for m in modes["data"]["beta"])
        hw = c.request({"request_id": "h", "work_id": "sys", "action": "hwinfo", "data": {"fleet": True}})
        assert all("cpu_loadavg" in hw["data"][board] for board in ("alpha", "beta")), hw
        plain = c.request({"request_id": "t", "work_id": "sys", "action": "lstask"})
        assert isinstance(plain["data"], list)  # without "fleet": this board only, as StackFlow lists it


def test_bad_messages_from_the_fleet_are_answered(two_boards, nats_server):
    """A rogue NATS client's garbage gets error answers; beta's bridge goes on serving."""
    import asyncio

    import msgpack
    import nats

    async def ask(body: bytes, headers: dict) -> list[dict]:
        nc = await nats.connect(nats_server.url, token=TOKEN)
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish("unitbus.board.beta", body, reply=inbox, headers=headers)
        answers = []
        while not answers or not answers[-1].get("final"):
            answers.append(msgpack.unpackb((await sub.next_msg(timeout=10)).data))
        await nc.close()
        return answers

    origin = {"Unitbus-Origin": "rogue/00/1"}
    binary_data = {"request_id": "r", "work_id": "sys", "action": "ping", "data": b"\x00"}  # JSON has no bytes
    for body, headers in ((b"\xc1 not msgpack", origin), (msgpack.packb({"request": {"work_id": 5}}), origin),
                          (msgpack.packb({"request": binary_data}, use_bin_type=True), origin),
                          (msgpack.packb({"request": {"request_id": "r", "work_id": "sys", "action": "ping"}}),
                           {"Unitbus-Origin": "no origin"})):
        answers = asyncio.run(ask(body, headers))
        assert answers[0]["response"]["error"]["code"] == -2, answers
    ok = asyncio.run(ask(msgpack.packb({"request": {"request_id": "r", "work_id": "sys", "action": "ping"}}), origin))
    assert ok[0]["response"]["error"]["code"] == 0 and ok[0]["response"]["work_id"] == "sys@beta", ok
