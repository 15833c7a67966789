"""Crashes of sys and of the bridge: every request in flight is answered, tasks are recovered or released
(spec §5.4)."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from support import StackFlowClient, free_port

pytestmark = pytest.mark.e2e

SLOW = {"model": "skel", "response_format": "skel.utf-8.stream", "delay_ms": 200}


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except (ConnectionError, OSError, TimeoutError, LookupError):  # a process restarting
            pass
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.2)


def ping(port: int) -> bool:
    with StackFlowClient(port, timeout=5) as c:
        return c.request({"request_id": "p", "work_id": "sys", "action": "ping"})["error"]["code"] == 0


def task_ids(c: StackFlowClient) -> list[str] | None:
    """The work_ids lstask lists; None while sys cannot answer (restarting)."""
    reply = c.request({"request_id": "l", "work_id": "sys", "action": "lstask"})
    return [t["work_id"] for t in reply["data"]] if reply["error"]["code"] == 0 else None


def test_kill_9_of_sys_mid_stream_ends_tcp_and_openai_streams_and_recovers(stack_factory):
    import openai

    port = free_port()
    stack = stack_factory(["skel", "llm"], {"skel.max_tasks": "4", "up.http": "true", "http.openai.port": str(port),
                                            "http.ollama.enabled": "false", "http.ai00.enabled": "false",
                                            "http.cortex.enabled": "false"})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    model = "smollm2-135m-instruct"
    def loaded() -> bool:
        try:
            return bool(client.completions.create(model=model, prompt="Hi", max_tokens=1))
        except openai.APIConnectionError:
            return False  # the gateway is not listening yet

    wait_until(loaded, 120, "the gateway up and the llm loaded")

    openai_started, openai_outcome = threading.Event(), {}

    def openai_stream() -> None:
        try:
            for chunk in client.chat.completions.create(
                    model=model, stream=True, max_tokens=2000,
                    messages=[{"role": "user", "content": "Tell a very long story about a bus, in many chapters."}]):
                if chunk.choices and chunk.choices[0].delta.content:
                    openai_started.set()
                if chunk.choices and chunk.choices[0].finish_reason:
                    openai_outcome["end"] = f"finish {chunk.choices[0].finish_reason}"
            openai_outcome.setdefault("end", "stream closed")
        except openai.APIError as exc:
            openai_outcome["end"] = f"error {exc}"
        finally:
            openai_started.set()
            openai_outcome["at"] = time.monotonic()

    with StackFlowClient(stack.port) as c:
        work_id = c.request({"request_id": "s", "work_id": "skel", "action": "setup", "data": SLOW})["work_id"]
        c.send({"request_id": "slow", "work_id": work_id, "action": "inference", "object": "skel.utf-8",
                "data": " ".join(["w"] * 100)})
        assert c.read_for("slow")["data"]["finish"] is False
        reader = threading.Thread(target=openai_stream)
        reader.start()
        assert openai_started.wait(60)
        assert "end" not in openai_outcome, openai_outcome  # still streaming when sys dies
        sys_pid = stack.pid_of("sys")
        os.kill(sys_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        while True:
            message = c.read_for("slow", timeout=5)
            if message["error"]["code"] != 0 or message["data"]["finish"]:
                break
        assert message["error"]["code"] == -9 and "sys restarted" in message["error"]["message"], message
        assert message["work_id"] == work_id and time.monotonic() - killed_at < 5
        reader.join(10)
        assert not reader.is_alive(), "the OpenAI stream never ended"
        assert openai_outcome["at"] - killed_at < 10, openai_outcome

        # The restarted sys recovered the task from the unit: same work_id, still usable, numbers go on.
        assert stack.pid_of("sys") != sys_pid
        wait_until(lambda: work_id in (task_ids(c) or []), 10, f"{work_id} recovered\n{stack.log()}")
        c.send({"request_id": "again", "work_id": work_id, "action": "inference", "object": "skel.utf-8",
                "data": "ok"})
        assert "".join(m["data"]["delta"] for m in c.stream("again")) == "OK"
        fresh = c.request({"request_id": "s2", "work_id": "skel", "action": "setup", "data": {"model": "skel"}})
        assert fresh["error"]["code"] == 0
        assert int(fresh["work_id"].rsplit(".", 1)[1]) > int(work_id.rsplit(".", 1)[1])
        c.expect_silence(0.5)  # nothing late from the stream that was cancelled
    answer = client.chat.completions.create(model=model, max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
    assert answer.choices[0].message.content


def test_kill_9_of_the_bridge_releases_its_tasks(stack_factory):
    stack = stack_factory(["skel"], {"skel.max_tasks": "1"})
    c = StackFlowClient(stack.port)
    work_id = c.request({"request_id": "s", "work_id": "skel", "action": "setup", "data": {"model": "skel"}})["work_id"]
    assert task_ids(c) == [work_id]
    bridge = stack.pid_of("bridge")
    os.kill(bridge, signal.SIGKILL)
    c.close()
    wait_until(lambda: stack.pid_of("bridge") != bridge and ping(stack.port), 30, "the bridge restarted")
    with StackFlowClient(stack.port) as c:
        wait_until(lambda: task_ids(c) == [], 5, "its task released")
        again = c.request({"request_id": "s2", "work_id": "skel", "action": "setup", "data": {"model": "skel"}})
        assert again["error"]["code"] == 0, again


def test_an_owner_that_leaves_while_sys_is_down_is_noticed_by_the_restarted_sys(stack_factory):
    stack = stack_factory(["skel"], {"skel.max_tasks": "2"})
    keeper = StackFlowClient(stack.port)
    kept = keeper.request({"request_id": "k", "work_id": "skel", "action": "setup",
                           "data": {"model": "skel", "response_format": "skel.utf-8.stream",
                                    "exit_on_disconnect": True}})["work_id"]
    leaver = StackFlowClient(stack.port)
    left = leaver.request({"request_id": "s", "work_id": "skel", "action": "setup",
                           "data": {"model": "skel", "exit_on_disconnect": True}})["work_id"]
    os.kill(stack.pid_of("sys"), signal.SIGKILL)
    leaver.close()  # its goodbye goes to the dead sys
    # After the restart the connection that stayed keeps its task, the one that left does not.
    wait_until(lambda: task_ids(keeper) == [kept], 15, f"{left} released, {kept} kept")
    keeper.send({"request_id": "i", "work_id": kept, "action": "inference", "object": "skel.utf-8", "data": "yes"})
    assert "".join(m["data"]["delta"] for m in keeper.stream("i")) == "YES"
    keeper.close()


def test_an_impostor_unit_is_refused_and_the_live_unit_keeps_its_tasks(skel_stack):
    import asyncio

    from core import bus, rundir

    async def register(key: str) -> bus.Message:
        ctx = bus.Context()
        sock = ctx.dealer(skel_stack.endpoint, bus.peer_identity("impostor"))
        try:
            sock.send(bus.Hello(role="unit", name="skel", names=["skel"], actions=["setup"], key=key))
            return await asyncio.wait_for(sock.recv(), 5)
        finally:
            sock.close()
            ctx.term()

    with StackFlowClient(skel_stack.port) as c:
        work_id = c.request({"request_id": "s", "work_id": "skel", "action": "setup",
                             "data": {"model": "skel", "response_format": "skel.utf-8.stream"}})["work_id"]
        wrong = asyncio.run(register("0" * 64))
        assert isinstance(wrong, bus.Control) and wrong.op == "refused" and "wrong registration key" in wrong.data
        key = (skel_stack.run_dir / rundir.KEY_FILE).read_text()
        second = asyncio.run(register(key))  # even a process of this stack cannot take a live unit's name
        assert isinstance(second, bus.Control) and second.op == "refused" and "already served" in second.data
        assert task_ids(c) == [work_id]
        c.send({"request_id": "i", "work_id": work_id, "action": "inference", "object": "skel.utf-8", "data": "mine"})
        assert "".join(m["data"]["delta"] for m in c.stream("i")) == "MINE"


def test_a_setup_loading_when_sys_dies_is_answered_and_leaves_no_task(stack_factory):
    stack = stack_factory(["skel"], {"skel.max_tasks": "1"})
    with StackFlowClient(stack.port) as c:
        c.send({"request_id": "load", "work_id": "skel", "action": "setup", "data": {"model": "skel", "load_ms": 3000}})
        time.sleep(0.5)  # the unit is loading
        os.kill(stack.pid_of("sys"), signal.SIGKILL)
        failed = c.read_for("load", timeout=5)
        assert failed["error"]["code"] == -9 and "sys restarted" in failed["error"]["message"]
        assert failed["work_id"] == "skel"
        time.sleep(3)  # the load has ended: its task must not have been kept
        assert wait_until(lambda: task_ids(c) is not None, 10, "sys back") and task_ids(c) == []
        again = c.request({"request_id": "s", "work_id": "skel", "action": "setup", "data": {"model": "skel"}})
        assert again["error"]["code"] == 0, again  # the only slot is free
        c.expect_silence(0.5)


def test_a_second_unit_process_waits_for_the_name_and_takes_over_when_the_first_dies(skel_stack, tmp_path):
    import subprocess
    import sys

    from support import REPO

    with StackFlowClient(skel_stack.port) as c:
        work_id = c.request({"request_id": "s", "work_id": "skel", "action": "setup", "data": {"model": "skel"}})["work_id"]
        log = tmp_path / "second.log"
        with open(log, "w") as out:
            second = subprocess.Popen([sys.executable, "-m", "units.skel", "--set", f"bus.run_dir={skel_stack.run_dir}"],
                                      cwd=REPO, env=skel_stack.env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: "already served by a live process" in log.read_text(), 30, "the second refused")
            assert task_ids(c) == [work_id]  # the live unit kept its task
            first = skel_stack.pid_of("skel")
            os.kill(first, signal.SIGKILL)
            setup = {"request_id": "s2", "work_id": "skel", "action": "setup", "data": {"model": "skel"}}
            wait_until(lambda: c.request(setup)["error"]["code"] == 0, 15, "a unit registered again")
        finally:
            second.kill()
            second.wait()
        assert log.read_text().count("sys refused this unit") == 1  # said once, not at every retry
