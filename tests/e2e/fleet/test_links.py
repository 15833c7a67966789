"""Links across boards (protocol.md §21.8): a task of one board takes the outputs of a task of another."""
from __future__ import annotations

import asyncio
import base64
import os
import signal
import time

import nats
import numpy as np
import pytest

from fleet_support import TOKEN, board, pid_of_module, setup_llm, text_of, wait_joined
from support import StackFlowClient, espeak_pcm, trim_silence

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def skel(c: StackFlowClient, work_id: str, request_id: str, mode: str, input="skel.utf-8") -> str:
    reply = c.request({"request_id": request_id, "work_id": work_id, "action": "setup", "object": "skel.setup",
                       "data": {"model": "skel", "response_format": "skel.utf-8", "input": input, "enoutput": True,
                                "mode": mode}}, timeout=30)
    assert reply["error"]["code"] == 0, reply
    return reply["work_id"]


def say(c: StackFlowClient, work_id: str, text: str, request_id: str = "say") -> dict:
    return c.request({"request_id": request_id, "work_id": work_id, "action": "inference", "object": "skel.utf-8",
                      "data": text})


@pytest.fixture(scope="module")
def skel_boards(tmp_path_factory, nats_server):
    a = board(tmp_path_factory.mktemp("la"), "la", nats_server.url, units=("skel",), **{"skel.max_tasks": "4"}).start()
    b = board(tmp_path_factory.mktemp("lb"), "lb", nats_server.url, units=("skel",), **{"skel.max_tasks": "4"}).start()
    try:
        wait_joined(a, "la", "lb")
        wait_joined(b, "la", "lb")
        yield a, b
    finally:
        codes = [b.stop(check=False), a.stop(check=False)]
    assert codes == [0, 0], (a.log()[-3000:], b.log()[-3000:])


def test_link_both_ways_and_unlink(skel_boards):
    a, _ = skel_boards
    with StackFlowClient(a.port, timeout=30) as c:
        up = skel(c, "skel", "up", "upper")
        # A setup on board lb whose input is a task of this board, named in the remote form.
        down = skel(c, "skel@lb", "down", "reverse", input=f"{up}@la")
        assert down.endswith("@lb")
        assert say(c, up, "hello")["data"] == "HELLO"
        out = c.read_for("down")
        assert out["work_id"] == down and out["data"] == "OLLEH" and out["error"]["code"] == 0, out
        # The reverse: a task of this board links to a task of lb.
        back = skel(c, "skel", "back", "lower")
        assert c.request({"request_id": "back", "work_id": back, "action": "link", "data": down})["error"]["code"] == 0
        say(c, up, "abc")
        assert c.read_for("down")["data"] == "CBA"
        back_out = c.read_for("back")
        assert back_out["work_id"] == back and back_out["data"] == "cba", back_out
        # Link ends are not tasks: neither board lists them.
        listing = c.request({"request_id": "ls", "work_id": "sys", "action": "lstask", "data": {"fleet": True}})
        assert sorted(t["work_id"] for t in listing["data"]["la"]) == sorted([f"{up}@la", f"{back}@la"]), listing
        assert [t["work_id"] for t in listing["data"]["lb"]] == [down], listing
        info = c.request({"request_id": "ti", "work_id": down, "action": "taskinfo"})
        assert info["data"]["inputs"] == [f"{up}@la"], info
        # unlink on lb stops the flow: up's outputs reach neither down nor, through it, back.
        unlink = c.request({"request_id": "ul", "work_id": down, "action": "unlink", "data": f"{up}@la"})
        assert unlink["error"]["code"] == 0, unlink
        assert say(c, up, "quiet")["data"] == "QUIET"
        # down itself still works, and its outputs still reach back: nothing of "quiet" came before them.
        assert say(c, down, "xyz", "direct")["data"] == "zyx"
        assert c.read_for("back")["data"] == "zyx"
        assert not [m for m in c.backlog if m["request_id"] in ("down", "back")], c.backlog
        for work_id in (back, down, up):
            assert c.request({"request_id": "x", "work_id": work_id, "action": "exit"})["error"]["code"] == 0


def test_bad_remote_inputs_are_answered(skel_boards):
    a, _ = skel_boards
    with StackFlowClient(a.port, timeout=30) as c:
        for source, words in (("skel.9999@lb", "no task skel.9999 on board lb"),
                              ("skel.1@nosuch", "no board named nosuch")):
            reply = c.request({"request_id": "bad", "work_id": "skel", "action": "setup",
                               "data": {"model": "skel", "input": source}})
            assert reply["error"]["code"] == -20 and words in reply["error"]["message"], reply
            assert reply["work_id"] == "skel"
        up = skel(c, "skel", "up", "upper")
        reply = c.request({"request_id": "bad", "work_id": "skel@lb", "action": "setup",
                           "data": {"model": "skel", "input": "sys.pcm@la"}})
        assert reply["error"]["code"] == -22, reply  # skel takes no audio, from here or elsewhere
        assert c.request({"request_id": "x", "work_id": up, "action": "exit"})["error"]["code"] == 0


def setup_when_back(c: StackFlowClient, work_id: str, request_id: str, mode: str, input: str) -> str:
    """skel's setup, again while the board's units restart after a sys.reset."""
    deadline = time.monotonic() + 30
    while True:
        reply = c.request({"request_id": request_id, "work_id": work_id, "action": "setup",
                           "data": {"model": "skel", "input": input, "enoutput": True, "mode": mode}}, timeout=30)
        if reply["error"]["code"] == 0:
            return reply["work_id"]
        assert time.monotonic() < deadline, reply
        time.sleep(0.2)


def test_links_after_sys_reset_of_either_board(skel_boards):
    a, _ = skel_boards
    with StackFlowClient(a.port, timeout=30) as c:
        up = skel(c, "skel", "up", "upper")
        skel(c, "skel@lb", "down", "reverse", input=f"{up}@la")
        assert c.request({"request_id": "r", "work_id": "sys@lb", "action": "reset"})["error"]["code"] == 0
        again = setup_when_back(c, "skel@lb", "again", "reverse", f"{up}@la")
        say(c, up, "ab")
        assert c.read_for("again")["data"] == "BA"
        # This board's reset: up is gone and numbers start over; lb lets go of the old up at once,
        # so the new task of the same work_id is linked afresh (not to a stale import).
        assert c.request({"request_id": "r", "work_id": "sys", "action": "reset"})["error"]["code"] == 0
        new_up = setup_when_back(c, "skel", "up2", "lower", "skel.utf-8")
        fresh = setup_when_back(c, "skel@lb", "fresh", "reverse", f"{new_up}@la")
        say(c, new_up, "CD")
        assert c.read_for("fresh")["data"] == "dc"
        assert not [m for m in c.backlog if m["request_id"] == "again"], c.backlog  # again's link went with up
        for work_id in (fresh, again, new_up):
            c.request({"request_id": "x", "work_id": work_id, "action": "exit"})


def test_a_board_killed_ends_its_links_with_an_error(skel_boards):
    a, b = skel_boards
    with StackFlowClient(a.port, timeout=30) as c:
        up = skel(c, "skel", "up", "upper")
        assert skel(c, "skel@lb", "down", "reverse", input=f"{up}@la").endswith("@lb")
        say(c, up, "one")
        assert c.read_for("down")["data"] == "ENO"
        os.kill(pid_of_module(b, "firmware_bridge.fleet"), signal.SIGKILL)
        ended = c.read_for("down", timeout=30)  # the error names the link that the setup "down" made
        assert ended["error"]["code"] == -9 and ended["work_id"] == f"{up}@la", ended
        # Silent for fleet.liveness_s, or back sooner as a new bridge process (its supervisor restarts it).
        assert ended["error"]["message"].startswith("unit call false: board lb "), ended
        assert ended["error"]["message"].endswith(f"the link of {up}@la ended"), ended
        assert say(c, up, "two")["data"] == "TWO"  # up goes on, its outputs no longer leave la
        wait_joined(a, "la", "lb")
        # A task here taking a task of lb; then this board's own bridge dies.
        far = skel(c, "skel@lb", "far", "upper")
        near = skel(c, "skel", "near", "lower", input=far)
        assert say(c, far, "Mixed")["data"] == "MIXED"
        assert c.read_for("near")["data"] == "mixed"
        os.kill(pid_of_module(a, "firmware_bridge.fleet"), signal.SIGKILL)
        ended = c.read_for("near", timeout=30)
        assert ended["error"]["code"] == -9 and ended["work_id"] == far, ended
        assert "unit fleet stopped" in ended["error"]["message"] and "the link of" in ended["error"]["message"]
        info = c.request({"request_id": "ti", "work_id": near, "action": "taskinfo"})
        assert info["data"]["inputs"] == [], info  # near no longer takes far: its link ended with the bridge
        wait_joined(a, "la", "lb")
        for work_id in (near, up):
            assert c.request({"request_id": "x", "work_id": work_id, "action": "exit"})["error"]["code"] == 0


def test_pcm_crosses_as_raw_binary(skel_boards, nats_server):
    """What a link puts on NATS: a skel output carries its envelope in a header and an empty payload;
    PCM (sys.pcm of a board) would be the payload itself (see test_voice_chain_across_boards)."""
    a, _ = skel_boards

    async def listen() -> list:
        nc = await nats.connect(nats_server.url, token=TOKEN)
        sub = await nc.subscribe("unitbus.link.lb")
        await nc.flush()  # subscribed on the server before the client below blocks this loop
        with StackFlowClient(a.port, timeout=30) as c:
            up = skel(c, "skel", "up", "upper")
            down = skel(c, "skel@lb", "down", "reverse", input=f"{up}@la")
            say(c, up, "wire")
            assert c.read_for("down")["data"] == "ERIW"
            msg = await sub.next_msg(timeout=10)
            for work_id in (down, up):
                c.request({"request_id": "x", "work_id": work_id, "action": "exit"})
        await nc.close()
        return [msg.data, dict(msg.headers), up]

    data, headers, up = asyncio.run(listen())
    assert data == b"" and headers["Unitbus-Source"] == f"{up}@la", headers
    assert '"data":"WIRE"' in headers["Unitbus-Response"], headers


@pytest.fixture(scope="module")
def voice_boards(tmp_path_factory, nats_server):
    """va has the microphone (the audio unit, fed by its clients' `capture`) and an asr; vb an asr and the llm."""
    a = board(tmp_path_factory.mktemp("va"), "va", nats_server.url, units=("audio", "asr"),
              **{"audio.capture": "push"}).start(timeout=300)
    b = board(tmp_path_factory.mktemp("vb"), "vb", nats_server.url, units=("asr", "llm")).start(timeout=300)
    try:
        wait_joined(a, "va", "vb")
        wait_joined(b, "va", "vb")
        yield a, b
    finally:
        codes = [b.stop(check=False), a.stop(check=False)]
    assert codes == [0, 0], (a.log()[-3000:], b.log()[-3000:])


ASR = {"model": "whisper-tiny.en", "response_format": "asr.utf-8.stream", "enoutput": True, "rule2": 0.8}


def test_voice_chain_across_boards(voice_boards, nats_server, tmp_path):
    """Speech on va's microphone -> va's asr -> the llm of vb -> the answer streamed to a client of va;
    then vb's own asr hears va's microphone, the PCM crossing NATS as the raw payload."""
    a, _ = voice_boards
    question = trim_silence(espeak_pcm("what is the capital of france", tmp_path))
    scene = np.concatenate([np.zeros(4800, np.int16), question, np.zeros(32000, np.int16)])

    def push(c: StackFlowClient, request_id: str) -> None:
        reply = c.request({"request_id": request_id, "work_id": "audio", "action": "capture",
                           "object": "audio.pcm.base64", "data": base64.b64encode(scene.tobytes()).decode()})
        assert reply["error"]["code"] == 0, reply

    async def run() -> list:
        nc = await nats.connect(nats_server.url, token=TOKEN)
        sub = await nc.subscribe("unitbus.link.vb")
        await nc.flush()
        with StackFlowClient(a.port, timeout=120) as c:
            reply = c.request({"request_id": "asr", "work_id": "asr", "action": "setup", "object": "asr.setup",
                               "data": {**ASR, "input": "sys.pcm"}}, timeout=120)
            assert reply["error"]["code"] == 0, reply
            asr = reply["work_id"]
            reply = setup_llm(c, "llm@vb", request_id="llm", input=f"{asr}@va", max_token_len=16)
            assert reply["error"]["code"] == 0, reply
            llm = reply["work_id"]
            push(c, "push")
            heard = c.read_for("asr")
            assert heard["work_id"] == asr and heard["data"]["delta"] == "what is the capital of france.", heard
            answer = c.stream("llm", timeout=120)
            assert all(m["work_id"] == llm and m["error"]["code"] == 0 for m in answer), answer
            assert answer[-1]["data"]["finish"] is True and text_of(answer).strip(), answer
            transcript = await sub.next_msg(timeout=10)  # va's asr output as vb received it: text, no PCM
            # vb's asr takes va's microphone.
            reply = c.request({"request_id": "far", "work_id": "asr@vb", "action": "setup", "object": "asr.setup",
                               "data": {**ASR, "input": "sys.pcm@va"}}, timeout=120)
            assert reply["error"]["code"] == 0, reply
            far = reply["work_id"]
            push(c, "push2")
            heard_far = c.read_for("far", timeout=60)
            assert heard_far["work_id"] == far and heard_far["data"]["delta"] == "what is the capital of france."
            assert c.read_for("asr", timeout=60)["work_id"] == asr  # va's asr heard it too; its llm link still works
            c.stream("llm", timeout=120)
            for work_id in (far, llm, asr):
                assert c.request({"request_id": "x", "work_id": work_id, "action": "exit"})["error"]["code"] == 0
        frames = []
        while True:
            try:
                frames.append(await sub.next_msg(timeout=0.5))
            except nats.errors.TimeoutError:
                break
        await nc.close()
        return [transcript, frames]

    transcript, frames = asyncio.run(run())
    assert transcript.data == b"" and transcript.headers["Unitbus-Source"].endswith("@va")
    pcm = [f for f in frames if f.headers["Unitbus-Source"] == "sys.pcm@va"]
    assert pcm and all(f.data and len(f.data) % 2 == 0 and "Unitbus-Response" not in f.headers for f in pcm)
    assert sum(len(f.data) for f in pcm) >= scene.nbytes * 0.9  # the whole utterance crossed, as raw int16
