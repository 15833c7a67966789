"""The Unit base in-process (core/unit/): a tiny unit with typed task state, driven through its setup,
inputs, queue, links, pause and exit by a real sys broker and a real bus client in one event loop.
No model and no process: what every unit inherits is tested here once."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from core import bus
from core.client import BusClient
from core.envelope import Request, Response
from core.errors import ErrorCode, UnitError
from core.manifest import Manifest
from core.settings import Settings
from core.sys.broker import Broker
from core.unit import Job, Task, Unit
from core.unit.inputs import check_link, check_source, inference_payload
from core.unit.task import CHAIN_QUEUE


@dataclass
class ProbeState:
    loads: int
    seen: list[str] = field(default_factory=list)  # chain inputs, in order
    gate: threading.Event = field(default_factory=threading.Event)  # a "hold" inference waits on it


class Probe(Unit[ProbeState]):
    """Answers text upper-cased with the number of its setup; "hold" blocks until released or cancelled."""
    name = "skel"  # the skel manifests (models/mode_skel-upper.json) serve as its models
    names = ("skel",)
    defaults = {"mode": "upper", "delay_ms": 0, "load_ms": 0, "tag": ""}
    default_input = "skel.utf-8"
    default_response_format = "skel.utf-8"
    link_kinds = frozenset({"skel"})
    input_sources = frozenset({"skel"})
    max_queue_default = 1

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.setups = 0

    def setup_data(self, name: str, data: dict[str, Any]) -> dict[str, Any]:
        return {"tag": "from-hook", **data}

    def load(self, task: Task[ProbeState]) -> ProbeState:
        if task.params["mode"] == "refuse":
            raise UnitError(ErrorCode.MODEL_LOADING, "refused by load")
        self.setups += 1
        task.setup_note = f"note {self.setups}"
        return ProbeState(self.setups)

    def on_inference(self, job: Job[ProbeState]) -> None:
        if job.payload == "hold":
            while not job.cancelled and not job.task.state.gate.wait(0.01):
                pass
            job.emit("released" if not job.cancelled else "cancelled")
            return
        if isinstance(job.payload, bytes):
            job.emit(f"{len(job.payload)} bytes")
            return
        job.emit(f"{job.payload.upper()} {job.task.state.loads} {job.task.params['tag']}")

    def on_chain(self, job: Job[ProbeState]) -> None:
        job.task.state.seen.append(job.payload["data"])
        job.emit(f"chained {job.payload['data']}")


@contextlib.asynccontextmanager
async def running(unit_class: type[Unit[Any]] = Probe) -> AsyncIterator[tuple[Probe, BusClient]]:
    run_dir = Path(tempfile.mkdtemp(prefix="ub-base-", dir="/tmp"))  # short: ipc paths are limited
    try:
        settings = Settings.load(run_dir / "none.toml", {"bus.run_dir": str(run_dir), "skel.max_tasks": 2,
                                                        "models.manifest_dir": str(run_dir)}, environ={})
        broker = Broker(settings)
        broker_task = asyncio.create_task(broker.run())
        await broker.ready.wait()
        unit = unit_class(settings)
        unit_task = asyncio.create_task(unit.serve())
        await asyncio.wait_for(unit.registered.wait(), 10)
        client = await BusClient.for_settings(settings, "test").start()
        try:
            yield unit, client  # type: ignore[misc]
        finally:
            await client.close()
            assert unit._stop is not None
            unit._stop.set()
            await asyncio.wait_for(unit_task, 10)
            broker_task.cancel()
            await asyncio.gather(broker_task, return_exceptions=True)  # run() closes the broker
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


async def setup(client: BusClient, conn: int = 0, **data: Any) -> Response:
    response = await client.request(Request("s", "skel", "setup", "None", {"model": "skel-upper", **data}), conn)
    assert response is not None
    return response


async def infer(client: BusClient, work_id: str, data: Any, object: str = "skel.utf-8", request_id: str = "i",
                conn: int = 0) -> Response | None:
    return await client.request(Request(request_id, work_id, "inference", object, data), conn, timeout=10)


# setup: the state load returns, the hooks ----------------------------------------------------------
def test_setup_keeps_the_state_load_returned_and_says_its_note():
    async def scenario() -> None:
        async with running() as (unit, client):
            first, second = await setup(client), await setup(client)
            assert (first.code, first.message) == (0, "note 1")
            assert second.message == "note 2"
            task = unit.tasks[first.work_id]
            assert isinstance(task.state, ProbeState) and task.state.loads == 1
            answer = await infer(client, second.work_id, "hello")
            assert answer is not None and answer.data == "HELLO 2 from-hook"  # setup_data's default
            tagged = unit.tasks[first.work_id]
            assert tagged.params["tag"] == "from-hook"
            full = await setup(client)
            assert full.code == ErrorCode.TASK_FULL and first.work_id in full.message
    run(scenario())


def test_a_refusing_load_answers_its_error_and_keeps_no_task():
    async def scenario() -> None:
        async with running() as (unit, client):
            refused = await setup(client, mode="refuse")
            assert (refused.code, refused.message) == (ErrorCode.MODEL_LOADING, "Model loading failed: refused by load")
            assert unit.tasks == {}
            bad_input = await setup(client, input=["nothing.utf-8"])
            assert (bad_input.code, bad_input.message) == (ErrorCode.UNSUPPORTED_LINK, "unsupported link target: nothing.utf-8")
    run(scenario())


# inputs ---------------------------------------------------------------------------------------
def test_inference_data_is_checked_and_streams_are_reassembled():
    async def scenario() -> None:
        async with running() as (unit, client):
            work_id = (await setup(client)).work_id
            empty = await infer(client, work_id, "  ")
            assert empty is not None and empty.code == ErrorCode.EMPTY_DATA
            bad = await infer(client, work_id, "@@@", object="skel.base64")
            assert bad is not None and bad.code == ErrorCode.BASE64_DECODING
            decoded = await infer(client, work_id, base64.b64encode(b"abcd").decode(), object="skel.base64")
            assert decoded is not None and decoded.data == "4 bytes"
            middle = await infer(client, work_id, {"delta": "ab", "index": 0, "finish": False},
                                 object="skel.utf-8.stream", request_id="st")
            assert middle is None  # nothing to say until the stream ends
            last = await infer(client, work_id, {"delta": "cd", "index": 1, "finish": True},
                               object="skel.utf-8.stream", request_id="st")
            assert last is not None and last.data == "ABCD 1 from-hook"
            missing = await infer(client, "skel.9999", "x")
            assert missing is not None and missing.code == ErrorCode.INFERENCE_PUSH
    run(scenario())


def test_inference_payload_rules():
    assert inference_payload("skel.utf-8", "text", None, True) == "text"
    assert inference_payload("skel.utf-8", "ignored", b"raw", True) == b"raw"
    assert inference_payload("asr.pcm", base64.b64encode(b"\x01\x02").decode(), None, False) == b"\x01\x02"
    for data, code in [("", ErrorCode.EMPTY_DATA), ("None", ErrorCode.EMPTY_DATA), (" ", ErrorCode.EMPTY_DATA),
                       (5, ErrorCode.EMPTY_DATA)]:
        if data == 5:
            with pytest.raises(UnitError) as caught:
                inference_payload("asr.pcm", data, None, False)
            assert caught.value.code == ErrorCode.JSON_FORMAT
            continue
        with pytest.raises(UnitError) as caught:
            inference_payload("skel.utf-8", data, None, True)
        assert caught.value.code == code


def test_links_are_checked_against_units_and_manifests():
    manifest = Manifest({"mode": "m", "type": "llm", "input_type": ["llm.utf-8"], "output_type": []}, Path("m.json"))
    snapshot = {"asr.1001": {"response_format": "asr.utf-8"}, "kws.1002": {"response_format": "kws.bool"}}
    assert check_link("llm.1003", "asr.1001", "llm", frozenset({"asr"}), manifest,
                      {"asr.1001": {"response_format": "llm.utf-8"}}) == "asr"
    cases = [("llm", ErrorCode.LINK_FALSE), ("asr.1009", ErrorCode.LINK_FALSE), ("llm.1003", ErrorCode.UNSUPPORTED_LINK),
             ("kws.1002", ErrorCode.UNSUPPORTED_LINK), ("asr.1001", ErrorCode.UNSUPPORTED_LINK)]
    for upstream, code in cases:
        with pytest.raises(UnitError) as caught:
            check_link("llm.1003", upstream, "llm", frozenset({"asr"}), manifest, snapshot)
        assert caught.value.code == code, upstream
    assert check_source("sys.pcm", frozenset({"sys"}), ["sys.pcm"]) == ("sys", None)
    assert check_source("sys.pcm@mic", frozenset({"sys"}), ["sys.pcm"]) == ("sys", "mic")
    for entry in ("llm.utf-8", "sys.other@mic", "sys.pcm@bad board"):
        with pytest.raises(UnitError) as caught:
            check_source(entry, frozenset({"sys"}), ["sys.pcm"])
        assert caught.value.message.endswith(entry)


def test_a_linked_task_gets_the_upstream_outputs_in_order():
    async def scenario() -> None:
        async with running() as (unit, client):
            outputs: list[Response] = []
            conn = client.open_conn(lambda response, final: outputs.append(response) if response else None)
            upstream = (await setup(client)).work_id
            downstream = await setup(client, conn, input=[upstream])
            assert downstream.code == 0, downstream
            for word in ("one", "two"):
                await infer(client, upstream, word, request_id=word)
            for _ in range(500):
                if len(outputs) == 2:
                    break
                await asyncio.sleep(0.01)
            assert unit.tasks[downstream.work_id].state.seen == ["ONE 1 from-hook", "TWO 1 from-hook"]
            assert [r.data for r in outputs] == ["chained ONE 1 from-hook", "chained TWO 1 from-hook"]
            unlinked = await client.request(Request("u", downstream.work_id, "unlink", "None", upstream), conn)
            assert unlinked is not None and unlinked.code == 0
            assert unit.tasks[downstream.work_id].upstream == {}
    run(scenario())


# the queue, pause and exit ---------------------------------------------------------------------
def test_the_queue_limit_pause_and_exit():
    async def scenario() -> None:
        async with running() as (unit, client):
            work_id = (await setup(client)).work_id
            task = unit.tasks[work_id]
            held = asyncio.create_task(infer(client, work_id, "hold", request_id="held"))
            while task.current is None:
                await asyncio.sleep(0.01)
            queued = asyncio.create_task(infer(client, work_id, "queued", request_id="queued"))
            while not task.queue:
                await asyncio.sleep(0.01)
            full = await infer(client, work_id, "third", request_id="third")
            assert full is not None and full.code == ErrorCode.QUEUE_FULL  # max_queue 1
            paused = await client.request(Request("p", work_id, "pause", "None", "queued"))
            assert paused is not None and paused.code == 0
            cancelled = await queued
            assert cancelled is not None and (cancelled.code, cancelled.message) == (ErrorCode.CANCELLED, "request cancelled: pause")
            task.state.gate.set()
            released = await held
            assert released is not None and released.data == "released"
            task.state.gate.clear()
            again = asyncio.create_task(infer(client, work_id, "hold", request_id="again"))
            while task.current is None:
                await asyncio.sleep(0.01)
            gone = await client.request(Request("e", work_id, "exit"))
            assert gone is not None and gone.code == 0
            assert work_id not in unit.tasks
            stopped = await again
            assert stopped is not None and stopped.data == "cancelled"
    run(scenario())


def test_task_queue_rules_without_a_bus():
    manifest = Manifest({"mode": "m", "type": "skel", "input_type": [], "output_type": []}, Path("m.json"))
    task: Task[None] = Task("skel.1000", "skel", "m", manifest, {}, "skel.utf-8", [], True, None, "0")
    route = bus.Route(b"c", 1, 1)

    def user(request_id: str) -> Job[None]:
        return Job(None, task, request_id, "skel.utf-8", "x", route=route)  # type: ignore[arg-type]

    task.put(user("a"), 1)
    with pytest.raises(UnitError) as caught:
        task.put(user("b"), 1)
    assert caught.value.code == ErrorCode.QUEUE_FULL
    task.put(user("c"), 1, continuing=True)  # the rest of an accepted stream
    for n in range(CHAIN_QUEUE + 1):
        task.put(Job(None, task, str(n), "None", n, source="skel.1001"), 1)  # type: ignore[arg-type]
    chain = [j.payload for j in task.queue if j.route is None]
    assert chain == list(range(1, CHAIN_QUEUE + 1))  # the oldest dropped
    assert task.user_jobs == 2
    task.drop_chain_jobs()
    assert [j.request_id for j in task.queue] == ["a", "c"]
    assert user("d").connection == (b"c", 1)


def test_routes_are_records_on_the_wire():
    message = bus.Message.decode(bus.Req(tag=1, conn=2, request={}, route=bus.Route(b"id", 1, 2)).encode())
    assert isinstance(message, bus.Req) and message.route == bus.Route(b"id", 1, 2)
    assert message.route.owner == bus.Owner(b"id", 2)
    broken = bus.Req(tag=1, conn=2, request={}).encode()
    import msgpack

    body = msgpack.unpackb(broken[0])
    body["route"] = [b"id"]
    with pytest.raises(bus.BadMessage):
        bus.Message.decode([msgpack.packb(body)])


class Listener(Probe):
    """Takes the published source feed.words (input "feed.words"), and publishes it when `offered`."""
    input_sources = frozenset({"skel", "feed"})
    subscribes = {"feed": "feed.words"}
    offered: str | None = None  # None: not published; "": published; else why not

    def published_sources(self) -> dict[str, str]:
        return {} if self.offered is None else {"feed.words": self.offered}


class OfflineFeed(Listener):
    offered = "feed is off: nothing to read"


class OnlineFeed(Listener):
    offered = ""


def test_a_published_input_needs_a_unit_that_publishes_it():
    async def scenario() -> None:
        for unit_class, code, message in [
                (Listener, ErrorCode.RESOURCE_ALLOCATION, "no unit publishes feed.words"),
                (OfflineFeed, ErrorCode.RESOURCE_ALLOCATION, "feed is off: nothing to read"),
                (OnlineFeed, 0, "")]:
            async with running(unit_class) as (unit, client):
                reply = await setup(client, input=["skel.utf-8", "feed.words"])
                assert reply.code == code and reply.message.endswith(message), (unit_class, reply)
                if code == 0:
                    # sys counted the new subscriber for the publisher before answering the next request.
                    await client.request(Request("t", reply.work_id, "taskinfo"))
                    assert unit.subscribers == {"feed.words": 1}
                    assert unit.subscriptions(unit.tasks[reply.work_id]) == ["feed.words"]
    run(scenario())
