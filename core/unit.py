"""The Unit base: what every unit process shares (spec §8, §10.5, §12, §18).

A unit author subclasses `Unit`, declares its setup keys and which inputs it takes, and implements
`load` (once per task, in a worker thread) and `on_inference` / `on_chain` (per job, in the task's worker
thread). The base does the bus, routing, the action table, per-task queues, streamed-input reassembly,
base64/WAV decoding, links, ownership, cancellation and one error boundary. Nothing here touches zmq
directly: bus sockets come from core.bus.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Coroutine

from core import bus, logs, notify
from core.envelope import NONE, Request, Response, error_reply, reply, stream_data
from core.errors import ErrorCode, UnitError
from core.ids import ObjectType, WorkId, is_task_ref, split_board
from core.manifest import Manifest, ManifestStore, merge_params
from core.microphone import PCM_SOURCE, capture_mode
from core.runtime import limit_malloc_arenas, return_memory_to_os
from core.settings import Settings, load_for_process
from core.streams import StreamAssembler
from core.supervisor import RESTART_EXIT

log = logging.getLogger(__name__)

BASE_ACTIONS = ("setup", "inference", "link", "unlink", "pause", "work", "exit", "taskinfo")
CHAIN_QUEUE = 64  # chain inputs waiting per task; the oldest is dropped beyond this (spec §18.1)
JOB_STOP_WAIT_S = 10.0


def restartable() -> bool:
    """Whether something starts this process again when it exits: `unitbus up` or systemd."""
    return bool(os.environ.get("UNITBUS_SUPERVISED") or os.environ.get("INVOCATION_ID"))


class Job:
    """One unit of work for a task: a client's inference or an input from a linked task.

    Its methods may be called from the worker thread; they hand messages to the event loop.
    """

    def __init__(self, unit: "Unit", task: "Task", request_id: str, object: str, payload: Any,
                 route: bus.Route | None = None, source: str | None = None, conn_key: tuple[Any, Any] | None = None):
        self.unit = unit
        self.task = task
        self.request_id = request_id
        self.object = object
        self.payload = payload
        self.route = route
        self.source = source  # upstream work_id (or sys.pcm) for chain jobs
        self.conn_key = conn_key  # (client, conn) of the sender, for cancel-on-disconnect
        self.cancel = threading.Event()
        self.index = 0
        self.finished = False  # a finish:true chunk went out
        self.done: asyncio.Future[None] | None = None

    @property
    def type(self) -> ObjectType:
        return ObjectType.parse(self.object)

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set()

    def emit(self, data: Any, object: str | None = None, binary: bytes | None = None) -> None:
        """One output: to the client that asked (or the owner, for chain jobs) when enoutput, and to linked tasks."""
        task = self.task
        response = Response(self.request_id, task.work_id, object or task.response_format, data)
        to_client = task.enoutput
        message = bus.Msg(response=response.to_dict(),
                          route=self.route if (to_client and self.route) else None,
                          owner=task.owner if (to_client and not self.route) else None,
                          publish=task.work_id, binary=binary)
        self.unit.send_threadsafe(message)

    def stream(self, delta: Any, finish: bool = False, **extra: Any) -> None:
        """One chunk of the response stream; index counts per job (spec §10.1)."""
        if self.finished:
            return
        self.emit(stream_data(self.index, delta, finish, **extra))
        self.index += 1
        self.finished = finish

    def pcm(self) -> Any:
        """The job's audio as 16 kHz mono int16 samples (from RAW bytes, base64 PCM or WAV)."""
        return decode_audio(self.object, self.payload)


def decode_audio(object: str, payload: Any) -> Any:
    from core import audio

    data = payload if isinstance(payload, (bytes, bytearray)) else None
    if data is None:
        raise UnitError(ErrorCode.UNSUPPORTED_OBJECT, f"{object}: audio must be base64 or raw bytes")
    flags = ObjectType.parse(object).flags
    if "mp3" in flags:
        raise UnitError(ErrorCode.UNSUPPORTED_OBJECT, "mp3")
    try:
        if "wav" in flags or (not {"pcm"} & flags and bytes(data[:4]) == b"RIFF"):
            return audio.parse_wav(bytes(data))
        return audio.pcm_from_bytes(bytes(data))
    except audio.UnsupportedAudio as exc:
        raise UnitError(ErrorCode.UNSUPPORTED_OBJECT, str(exc)) from None
    except audio.BadAudio as exc:
        raise UnitError(ErrorCode.JSON_FORMAT, f"bad audio: {exc}") from None


@dataclass(eq=False)
class Task:
    """One configured instance of a unit (a work_id). Units keep their own state in `state`."""
    work_id: str
    name: str  # the unit name used at setup ("melotts" for melotts.1003)
    model: str  # the model name the client asked for
    manifest: Manifest
    params: dict[str, Any]
    response_format: str
    inputs: list[str]
    enoutput: bool
    owner: bus.Owner | None
    last_request_id: str
    upstream: dict[str, str] = field(default_factory=dict)  # linked work_id -> unit kind
    sources: set[str] = field(default_factory=set)  # first tokens of non-task entries ("llm", "sys")
    exit_on_disconnect: bool = False
    paused: bool = False
    state: dict[str, Any] = field(default_factory=dict)
    queue: collections.deque[Job] = field(default_factory=collections.deque)
    current: Job | None = None
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    worker: asyncio.Task[None] | None = None
    closed: bool = False

    @property
    def stream_output(self) -> bool:
        return ObjectType.parse(self.response_format).stream

    def info(self) -> dict[str, Any]:
        return {"enoutput": self.enoutput, "inputs": list(self.inputs), "model": self.model,
                "response_format": self.response_format,
                "output_type": self.manifest.output_type, "state": "paused" if self.paused else "ready"}

    @property
    def user_jobs(self) -> int:
        return sum(1 for j in self.queue if j.route is not None)


class Unit:
    """Subclass this. Class attributes describe the unit; methods below marked 'override' are the hooks."""

    name: ClassVar[str] = ""
    names: ClassVar[tuple[str, ...]] = ()  # all names served (aliases such as whisper, melotts)
    version: ClassVar[str] = "0.1.0"
    extra_actions: ClassVar[tuple[str, ...]] = ()
    no_task_actions: ClassVar[tuple[str, ...]] = ()  # actions answered -18 (e.g. audio's inference)
    features: ClassVar[tuple[str, ...]] = ()
    # Setup keys this unit knows with their defaults (types are checked against them, spec §17.4).
    defaults: ClassVar[dict[str, Any]] = {}
    default_input: ClassVar[str] = ""
    default_response_format: ClassVar[str] = ""
    default_enoutput: ClassVar[bool] = True
    link_kinds: ClassVar[frozenset[str]] = frozenset()  # upstream unit kinds it takes as links
    input_sources: ClassVar[frozenset[str]] = frozenset()  # first tokens of non-link input entries
    max_queue_default: ClassVar[int] = 3
    reassemble_streams: ClassVar[bool] = True
    needs_text: ClassVar[bool] = True  # inference data is text (else audio bytes)
    # Give freed memory back to the OS when a job leaves the task idle: for units whose jobs allocate
    # and free large tensors (a transcription, a sentence), not for those that run every 80 ms.
    trim_when_idle: ClassVar[bool] = False

    def __init__(self, settings: Settings):
        self.settings = settings
        self.endpoint = settings.bus_endpoint()
        self.key = settings.bus_key()
        self.heartbeat_s = float(settings["bus.heartbeat_s"])
        self.liveness_s = float(settings["bus.liveness_s"])
        self.max_tasks = int(settings.get(f"{self.name}.max_tasks", 1))
        self.manifests = ManifestStore(settings)
        self.tasks: dict[str, Task] = {}
        self.streams = StreamAssembler(int(settings["framing.max_stream_bytes"]), float(settings["timeouts.stream_idle_s"]))
        self._models: dict[Any, Any] = {}
        self._models_lock = threading.Lock()
        self._ctx = bus.Context()
        self.identity = bus.peer_identity(self.name)
        self.sock: bus.DealerSocket | None = None
        self._epoch = 0  # counts registrations with sys: a setup that outlives one is not announced
        self._refusal: Any = None  # the last reason sys gave for refusing this unit
        self.loop: asyncio.AbstractEventLoop | None = None
        self._last_from_sys = time.monotonic()
        self._background: set[asyncio.Task[Any]] = set()
        self.registered = asyncio.Event()
        self.exit_code = 0
        self._stop: asyncio.Event | None = None

    # hooks (override) --------------------------------------------------------------------------
    def load(self, task: Task) -> None:
        """Worker thread: load or share the model for a new task; raise UnitError to refuse the setup."""

    def on_inference(self, job: Job) -> None:
        """Worker thread: answer a client's inference (job.payload is text, or bytes for audio)."""
        raise UnitError(ErrorCode.NO_UNIT_ACTION)

    def on_chain(self, job: Job) -> None:
        """Worker thread: handle an output of a linked task (job.payload is its response dict or PCM bytes)."""

    def chain_arrived(self, task: Task, source: str, response: dict[str, Any] | None, binary: bytes | None) -> bool:
        """Event loop: a chain input arrived. Return True when handled here (e.g. barge-in), else it is queued."""
        return False

    def on_pause(self, task: Task) -> None:
        """Event loop: after the running job was stopped."""

    def on_work(self, task: Task) -> None:
        """Event loop: `work` resumes the task."""

    def on_exit(self, task: Task) -> None:
        """Event loop: the task is going away; release what it holds."""

    def describe(self, task: Task) -> dict[str, Any]:
        """Event loop: what taskinfo and lstask show; units may add keys (clients ignore extra keys)."""
        return task.info()

    async def on_action(self, task: Task | None, request: Request, route: bus.Route, binary: bytes | None) -> Response | None:
        """Event loop: a unit-specific action (extra_actions)."""
        raise UnitError(ErrorCode.NO_UNIT_ACTION)

    # helpers for units -------------------------------------------------------------------------
    def shared_model(self, key: Any, loader: Callable[[], Any]) -> Any:
        """A model loaded once per process and shared by every task that uses it (spec §18.4)."""
        with self._models_lock:
            if key not in self._models:
                self._models[key] = loader()
            return self._models[key]

    def send_threadsafe(self, message: bus.Msg) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self.send, message)

    def send(self, message: bus.Message) -> None:
        if self.sock is not None:
            self.sock.send(message)

    def publish(self, source: str, binary: bytes | None = None, data: Any = None) -> None:
        """Thread-safe: publish under a source name with no task behind it (the audio unit's sys.pcm).

        sys delivers it to the tasks subscribed to `source` and to units that declared the feature
        `sink:<source>` (how tts hands audio to the audio unit's player)."""
        response = None if data is None else Response("0", source, source, data).to_dict()
        self.send_threadsafe(bus.Msg(response=response, publish=source, binary=binary))

    def chain_job(self, task: Task, source: str, payload: Any, object: str = NONE) -> Job:
        return Job(self, task, task.last_request_id, object, payload, route=None, source=source)

    def enqueue(self, task: Task, job: Job) -> None:
        """Queue a job for the task's worker. User jobs beyond max_queue get -32; chain jobs drop the oldest."""
        if job.route is not None:
            limit = int(task.params.get("max_queue", self.max_queue_default))
            if task.user_jobs >= limit:
                raise UnitError(ErrorCode.QUEUE_FULL, f"{task.user_jobs} requests queued on {task.work_id}")
        else:
            chain = [j for j in task.queue if j.route is None]
            if len(chain) >= CHAIN_QUEUE:
                task.queue.remove(chain[0])
                log.warning("%s: chain input from %s dropped, the task cannot keep up", task.work_id, chain[0].source)
        task.queue.append(job)
        task.wakeup.set()

    # process -----------------------------------------------------------------------------------
    @classmethod
    def main(cls, argv: list[str] | None = None) -> None:
        limit_malloc_arenas()
        parser = argparse.ArgumentParser(prog=f"unitbus-{cls.name}", description=f"the unitbus {cls.name} unit")
        parser.add_argument("--config", help="path of unitbus.toml")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        args = parser.parse_args(argv)
        settings = load_for_process(f"unitbus-{cls.name}", args.config, args.set)
        logs.configure(settings["log.level"], cls.name)
        unit = cls(settings)
        asyncio.run(unit.serve())
        sys.exit(unit.exit_code)

    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        stop = self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, stop.set)
        self._connect()
        self._hello()
        receiver = asyncio.create_task(self._receive_loop())
        beat = asyncio.create_task(self._heartbeat_loop())
        watchdog = asyncio.create_task(notify.watchdog_loop())
        stopper = asyncio.create_task(stop.wait())
        await self.registered.wait()  # READY=1 only once sys knows us (spec §19)
        notify.ready(f"{self.name} unit on {self.endpoint}")
        await asyncio.wait([receiver, beat, stopper], return_when=asyncio.FIRST_COMPLETED)
        notify.notify("STOPPING=1")
        for task in list(self.tasks.values()):
            await self._exit_task(task, "unit stopping")
        for t in (receiver, beat, watchdog, stopper, *self._background):
            t.cancel()
        await asyncio.gather(receiver, beat, watchdog, stopper, return_exceptions=True)
        if self.sock is not None:
            self.sock.send(bus.Gone())  # goodbye: sys lets the process that replaces this one register
            self.sock.close(linger_s=bus.GOODBYE_LINGER_S)
        self._ctx.term()

    def _connect(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = self._ctx.dealer(self.endpoint, self.identity)

    def _register_again(self, why: str) -> None:
        """sys restarted or lost us: register again with every task, so a new sys recovers them (spec §5.4).

        The requests in flight died with the old sys and their clients have answered them, so the
        unit stops their work (an answer still goes out, for a sys that only lost us for a while)."""
        self._epoch += 1
        self._hello()
        for task in self.tasks.values():
            self._announce(task)
        for task in self.tasks.values():
            for job in [j for j in task.queue if j.route is not None]:
                self._cancel_queued(task, job, why)
            if task.current is not None and task.current.route is not None:
                task.current.cancel.set()

    def _hello(self) -> None:
        actions = [a for a in (*BASE_ACTIONS, *self.extra_actions) if a not in self.no_task_actions]
        self.send(bus.Hello(role="unit", name=self.name, names=list(self.names or (self.name,)),
                            actions=actions, version=self.version, features=list(self.features), key=self.key))
        self._last_from_sys = time.monotonic()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            self.send(bus.Heartbeat())
            if time.monotonic() - self._last_from_sys > self.liveness_s:
                log.warning("sys silent for %.1f s: connecting and registering again", self.liveness_s)
                self._connect()
                self._register_again("sys stopped answering")

    async def _receive_loop(self) -> None:
        while True:
            assert self.sock is not None
            try:
                message = await self.sock.recv()
            except asyncio.CancelledError:
                raise
            except bus.SocketClosed:  # _connect() replaced the socket: receive on the new one
                continue
            except bus.BadMessage as exc:
                log.error("undecodable bus message dropped: %s", exc)
                continue
            except Exception:  # a bug in receiving must not stop the loop
                log.exception("bus receive failed")
                continue
            self._last_from_sys = time.monotonic()
            refused = isinstance(message, bus.Control) and message.op == "refused"
            if not refused and not isinstance(message, bus.Hello):
                self.registered.set()  # sys answers a hello it accepts with a heartbeat
                self._refusal = None
            try:
                await self._handle(message)
            except Exception:
                log.exception("error while handling %s", type(message).__name__)

    async def _handle(self, message: bus.Message) -> None:
        if isinstance(message, bus.Req):
            self._spawn(self._request(message))
        elif isinstance(message, bus.Chain):
            self._chain(message)
        elif isinstance(message, bus.Gone):
            await self._gone(message)
        elif isinstance(message, bus.TaskEvent) and message.op == "down":
            self._upstream_gone(message.work_id)
        elif isinstance(message, bus.Control):
            await self._control(message)
        elif isinstance(message, bus.Hello):
            if self._refusal is None:  # a refused unit is asked every heartbeat: no news
                log.warning("sys does not know this unit (it restarted): registering again with %d tasks",
                            len(self.tasks))
            self._register_again("sys restarted")

    async def _control(self, message: bus.Control) -> None:
        if message.op == "reset":
            await self._drop_all_tasks("sys.reset")
            restart = restartable() and self._stop is not None
            self.send(bus.Control("reset_done", {"restart": restart}))
            if restart:  # a fresh process; sys writes "reset over" once it has registered again
                log.info("sys.reset: restarting")
                self.exit_code = RESTART_EXIT
                assert self._stop is not None  # restart implies it
                self._stop.set()
        elif message.op == "refused":
            if message.data != self._refusal:  # it asks again every heartbeat: say it once
                log.error("sys refused this unit: %s", message.data)
            self._refusal = message.data
        elif message.op == "live":
            await self._drop_stale_owners(message.data)
        else:
            self.on_control(message)

    def on_control(self, message: bus.Control) -> None:
        """Event loop: housekeeping from sys (e.g. the subscriber count of sys.pcm); override if needed."""

    def on_sink(self, source: str, response: dict[str, Any] | None, binary: bytes | None) -> None:
        """Event loop: something published under a source this unit declared as `sink:<source>`."""

    # requests ----------------------------------------------------------------------------------
    def _reply(self, route: bus.Route, response: Response | None, final: bool = True) -> None:
        self.send(bus.Msg(response=response.to_dict() if response else None, route=route, final=final))

    async def _request(self, message: bus.Req) -> None:
        """The error boundary: every request ends with an answer."""
        route = message.route or []
        try:
            request = Request.from_dict(message.request)
        except (KeyError, TypeError):
            self._reply(route, error_reply("0", self.name, ErrorCode.JSON_FORMAT))
            return
        error_work_id = request.work_id
        try:
            if request.action == "setup":
                error_work_id = WorkId.parse(message.assigned or request.work_id).unit  # type: ignore[union-attr]
                await self._setup(request, message, route)
            elif request.action == "inference":
                self._inference(request, message, route)
            else:
                await self._control_action(request, message, route)
        except UnitError as exc:
            self._reply(route, error_reply(request.request_id, error_work_id, exc))
        except Exception as exc:
            log.exception("%s %s failed", request.work_id, request.action)
            code = {"setup": ErrorCode.MODEL_LOADING, "inference": ErrorCode.MODEL_RUN}.get(
                request.action, ErrorCode.OPERATION_FAILED)
            self._reply(route, error_reply(request.request_id, error_work_id, code, str(exc) or type(exc).__name__))

    def _task(self, request: Request) -> Task:
        task = self.tasks.get(request.work_id)
        if task is None:
            raise UnitError(ErrorCode.UNIT_NOT_EXIST)
        return task

    def _take_ownership(self, task: Task, route: bus.Route) -> None:
        if task.owner is None and route:
            task.owner = [route[0], route[2]]

    async def _control_action(self, request: Request, message: bus.Req, route: bus.Route) -> None:
        action = request.action
        work_id = WorkId.parse(request.work_id)
        if action in self.no_task_actions:
            raise UnitError(ErrorCode.NO_UNIT_ACTION)
        if action == "taskinfo" and work_id is not None and not work_id.is_task:
            # Every task of this process, whatever name it was set up under (tts and melotts share slots).
            names = sorted(self.tasks.values(), key=lambda t: int(t.work_id.rsplit(".", 1)[1]))
            self._reply(route, reply(request, data=[t.work_id for t in names], object=f"{work_id.unit}.tasklist"))
            return
        if action in self.extra_actions:
            task = self.tasks.get(request.work_id)
            response = await self.on_action(task, request, route, message.binary)
            self._reply(route, response)
            return
        task = self._task(request)
        if action == "taskinfo":
            self._reply(route, reply(request, data=self.describe(task), object=f"{task.name}.taskinfo"))
            return
        task.last_request_id = request.request_id
        self._take_ownership(task, route)
        if action == "link":
            self._link(task, request.data, (message.ctx or {}).get("tasks", {}))
            self._announce(task)
        elif action == "unlink":
            if isinstance(request.data, str) and request.data in task.inputs:
                task.inputs.remove(request.data)
                task.upstream.pop(request.data, None)
                self._announce(task)
        elif action == "pause":
            await self._pause(task, request.data)
        elif action == "work":
            task.paused = False
            self.on_work(task)
        elif action == "exit":
            await self._exit_task(task, "task exited")
        self._reply(route, reply(request))

    # setup -------------------------------------------------------------------------------------
    async def _setup(self, request: Request, message: bus.Req, route: bus.Route) -> None:
        epoch = self._epoch
        assigned = message.assigned or ""
        name = assigned.split(".")[0] or request.unit
        data = request.data
        if not isinstance(data, dict):
            raise UnitError(ErrorCode.JSON_FORMAT, "setup data must be an object")
        snapshot = (message.ctx or {}).get("tasks", {})
        reclaimed = await self._make_room(snapshot)
        model = data.get("model")
        if not isinstance(model, str) or not model:
            raise UnitError(ErrorCode.MODEL_LOADING, "required key model missing")
        manifest, note = self.manifests.resolve(model, name)
        defaults = {
            "model": "", "response_format": self.default_response_format, "input": [self.default_input],
            "enoutput": self.default_enoutput, "progress": False, "exit_on_disconnect": False,
            "max_queue": self.max_queue_default, **self.defaults,
        }
        params = merge_params(defaults, manifest.params, data)
        params["model"] = model
        ignored = sorted(k for k in data if k not in defaults and k not in manifest.params)
        if ignored:  # StackFlow ignores keys it does not know; say so rather than pretend (spec §17.4)
            note = "; ".join(n for n in (note, "ignored setup keys: " + ", ".join(ignored)) if n)
        inputs = params["input"]
        if not all(isinstance(i, str) for i in inputs):
            raise UnitError(ErrorCode.JSON_FORMAT, "input: expected a string or a list of strings")
        task = Task(work_id=assigned, name=name, model=model, manifest=manifest, params=params,
                    response_format=str(params["response_format"]), inputs=[], enoutput=bool(params["enoutput"]),
                    owner=[route[0], route[2]] if route else None, last_request_id=request.request_id,
                    exit_on_disconnect=bool(params["exit_on_disconnect"]))
        for entry in inputs:
            if is_task_ref(entry):
                self._link(task, entry, snapshot)
            else:
                self._add_source(task, entry)
        if "sys" in task.sources and capture_mode(self.settings) is None:
            raise UnitError(ErrorCode.RESOURCE_ALLOCATION, "no capture device for sys.pcm "
                            "(no ALSA capture PCM, no audio.source_wav, audio.capture is not push)")
        if params["progress"] and route:
            task.state["progress"] = lambda percent, stage="loading": self.send_threadsafe(bus.Msg(
                response=Response(request.request_id, name, f"{name}.setup.progress",
                                  {"stage": stage, "percent": int(percent)}).to_dict(), route=route))
        await asyncio.to_thread(self.load, task)
        if epoch != self._epoch:  # sys restarted during the load: the client was told its setup failed
            raise UnitError(ErrorCode.UNIT_CALL, "sys restarted during the setup; set up again")
        if len(self.tasks) >= self.max_tasks:  # another setup finished while this one loaded
            raise self._task_full()
        self.tasks[task.work_id] = task
        task.worker = asyncio.create_task(self._worker(task))
        self._announce(task)
        # load() may leave a note of a setting it substituted (spec §8.1: e.g. a wake word the model lacks).
        note = "; ".join(n for n in (note, task.state.pop("setup_note", ""), reclaimed) if n)
        self._reply(route, Response(request.request_id, task.work_id, message=note))

    async def _make_room(self, snapshot: dict[str, dict[str, Any]]) -> str:
        """A slot for a new task, reclaiming orphans when the unit is full; a note naming them, or -21.

        An orphan is a task whose owner disconnected, that is idle, that links nothing and that no
        task links to: nobody can be using it (README, "Task slots")."""
        if len(self.tasks) < self.max_tasks:
            return ""
        if not self.settings.get("tasks.reclaim_orphans", True):
            raise self._task_full()
        linked = {i for info in snapshot.values() for i in info.get("inputs", [])}
        orphans = [t for t in self.tasks.values()
                   if t.owner is None and not t.upstream and t.work_id not in linked
                   and t.current is None and not t.queue]
        orphans.sort(key=lambda t: int(t.work_id.rsplit(".", 1)[1]))
        needed = len(self.tasks) - self.max_tasks + 1
        if len(orphans) < needed:
            raise self._task_full()
        for task in orphans[:needed]:
            log.info("%s reclaimed: its owner left and nothing uses it", task.work_id)
            await self._exit_task(task, "reclaimed")
        return "reclaimed " + ", ".join(t.work_id for t in orphans[:needed]) + " (owner gone, unused)"

    def _task_full(self) -> UnitError:
        holders = ", ".join(f"{t.work_id} ({t.model}, {'owner connected' if t.owner else 'owner gone'}"
                            f"{', linked' if t.upstream else ''})"
                            for t in sorted(self.tasks.values(), key=lambda t: int(t.work_id.rsplit('.', 1)[1])))
        slots = "slot" if self.max_tasks == 1 else "slots"
        return UnitError(ErrorCode.TASK_FULL, f"{self.max_tasks} {self.name} {slots} held by {holders}")

    def _add_source(self, task: Task, entry: str) -> None:
        local, board = split_board(entry)
        token = local.split(".", 1)[0]
        if token not in self.input_sources or (board is not None and local != PCM_SOURCE):
            raise UnitError(ErrorCode.UNSUPPORTED_LINK, entry)
        if board is not None:  # another board's microphone (`sys.pcm@mic`), imported by the fleet bridge
            task.upstream[entry] = token
            task.inputs.append(entry)
            return
        task.sources.add(token)
        task.inputs.append(entry)

    def _link(self, task: Task, upstream: Any, snapshot: dict[str, dict[str, Any]]) -> None:
        """Subscribe the task to an upstream task's outputs, checked against the unit and the manifests."""
        if not isinstance(upstream, str) or not is_task_ref(upstream):
            raise UnitError(ErrorCode.LINK_FALSE)
        if upstream in task.upstream:
            return
        if upstream == task.work_id:
            raise UnitError(ErrorCode.UNSUPPORTED_LINK, f"{upstream} cannot link to itself")
        other = snapshot.get(upstream)
        if other is None:
            raise UnitError(ErrorCode.LINK_FALSE)
        kind = upstream.split(".")[0]
        if kind not in self.link_kinds:
            raise UnitError(ErrorCode.UNSUPPORTED_LINK, f"{self.name} does not take input from {kind}")
        produced = other.get("response_format", "")
        accepted = task.manifest.input_type
        if produced and not any(t == produced or t.split(".")[0] == produced.split(".")[0] for t in accepted):
            raise UnitError(ErrorCode.UNSUPPORTED_LINK,
                            f"{upstream} outputs {produced}, which {task.manifest.mode} does not take")
        task.upstream[upstream] = kind
        task.inputs.append(upstream)

    def subscriptions(self, task: Task) -> list[str]:
        subs = list(task.upstream)
        if "sys" in task.sources:
            subs.append(PCM_SOURCE)
        return subs

    def _announce(self, task: Task) -> None:
        self.send(bus.TaskEvent(op="up", work_id=task.work_id, info=self.describe(task), subscribe=self.subscriptions(task)))

    def _upstream_gone(self, work_id: str) -> None:
        for task in self.tasks.values():
            if work_id in task.upstream:
                task.upstream.pop(work_id)
                if work_id in task.inputs:
                    task.inputs.remove(work_id)
                self._announce(task)

    # inference ---------------------------------------------------------------------------------
    def _inference(self, request: Request, message: bus.Req, route: bus.Route) -> None:
        task = self.tasks.get(request.work_id)
        if task is None:
            raise UnitError(ErrorCode.INFERENCE_PUSH)
        if "inference" in self.no_task_actions:
            raise UnitError(ErrorCode.NO_UNIT_ACTION)
        task.last_request_id = request.request_id
        self._take_ownership(task, route)
        conn_key = (route[0], route[2]) if route else None
        kind = ObjectType.parse(request.object)
        payload: Any = request.data
        if message.binary is not None:
            payload = message.binary
        elif kind.stream and self.reassemble_streams:
            payload = self.streams.feed(conn_key or (None, None), task.work_id, request.data)
            if payload is None:
                self._reply(route, None)  # a chunk in the middle of a stream: nothing to say yet
                return
        if message.binary is None and (kind.base64 or not self.needs_text):
            if not isinstance(payload, str):
                raise UnitError(ErrorCode.JSON_FORMAT, "data must be a base64 string")
            try:
                payload = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise UnitError(ErrorCode.BASE64_DECODING) from None
        if payload in ("", b"", None, NONE) or (isinstance(payload, str) and not payload.strip() and self.needs_text):
            raise UnitError(ErrorCode.EMPTY_DATA)
        job = Job(self, task, request.request_id, request.object, payload, route=route, conn_key=conn_key)
        self.enqueue(task, job)

    def _chain(self, message: bus.Chain) -> None:
        if split_board(message.src)[0] == PCM_SOURCE:
            message.src = PCM_SOURCE  # another board's microphone is a microphone to the task that took it
        if not message.dst:
            try:
                self.on_sink(message.src, message.response, message.binary)
            except Exception:
                log.exception("sink %s failed", message.src)
            return
        for work_id in message.dst:
            task = self.tasks.get(work_id)
            if task is None or task.closed:
                continue
            try:
                if self.chain_arrived(task, message.src, message.response, message.binary):
                    continue
                payload = message.binary if message.binary is not None else message.response
                self.enqueue(task, self.chain_job(task, message.src, payload))
            except Exception:
                log.exception("%s: chain input from %s failed", work_id, message.src)

    async def _worker(self, task: Task) -> None:
        while not task.closed:
            if not task.queue:
                task.wakeup.clear()
                await task.wakeup.wait()
                continue
            job = task.queue.popleft()
            task.current = job
            job.done = asyncio.get_running_loop().create_future()
            try:
                await asyncio.to_thread(self._run_job, job)
            finally:
                task.current = None
                if not job.done.done():
                    job.done.set_result(None)
                if job.route:
                    self._reply(job.route, None)  # the request is over: sys forgets it

    def _run_job(self, job: Job) -> None:
        """Worker thread: one job with the error boundary; errors go where the job's outputs would."""
        try:
            if job.route is not None:
                self.on_inference(job)
            else:
                self.on_chain(job)
            if job.cancelled and job.task.stream_output and job.index and not job.finished:
                job.stream("", True)
        except UnitError as exc:
            self._job_error(job, exc)
        except Exception as exc:
            log.exception("%s: job %s failed", job.task.work_id, job.request_id)
            self._job_error(job, UnitError(ErrorCode.MODEL_RUN, str(exc) or type(exc).__name__))
        finally:
            if self.trim_when_idle and not job.task.queue:
                return_memory_to_os()

    def _job_error(self, job: Job, exc: UnitError) -> None:
        response = error_reply(job.request_id, job.task.work_id, exc)
        if job.route is not None:
            self.send_threadsafe(bus.Msg(response=response.to_dict(), route=job.route))
        elif job.task.owner is not None:
            self.send_threadsafe(bus.Msg(response=response.to_dict(), owner=job.task.owner))

    # stopping work -----------------------------------------------------------------------------
    async def _stop_job(self, job: Job) -> None:
        job.cancel.set()
        if job.done is not None:
            try:
                await asyncio.wait_for(asyncio.shield(job.done), JOB_STOP_WAIT_S)
            except asyncio.TimeoutError:
                log.error("%s: job %s did not stop within %.0f s", job.task.work_id, job.request_id, JOB_STOP_WAIT_S)

    def _cancel_queued(self, task: Task, job: Job, detail: str) -> None:
        task.queue.remove(job)
        if job.route is not None:
            self._reply(job.route, error_reply(job.request_id, task.work_id, ErrorCode.CANCELLED, detail))

    async def _pause(self, task: Task, data: Any) -> None:
        target = data.get("request_id") if isinstance(data, dict) else (data if data not in (NONE, "") else None)
        if isinstance(target, str):
            for job in list(task.queue):
                if job.request_id == target:
                    self._cancel_queued(task, job, "pause")
            if task.current is not None and task.current.request_id == target:
                await self._stop_job(task.current)
            return
        if task.current is not None:
            await self._stop_job(task.current)
        task.paused = True
        self.on_pause(task)

    async def _exit_task(self, task: Task, why: str) -> None:
        if task.closed:
            return
        task.closed = True
        for job in list(task.queue):
            self._cancel_queued(task, job, why)
        if task.current is not None:
            await self._stop_job(task.current)
        if task.worker is not None:
            task.worker.cancel()
        try:
            self.on_exit(task)
        except Exception:
            log.exception("%s: on_exit failed", task.work_id)
        self.tasks.pop(task.work_id, None)
        self.streams.drop_target(task.work_id)
        self.send(bus.TaskEvent(op="down", work_id=task.work_id))

    async def _drop_stale_owners(self, live: list[Any]) -> None:
        """A restarted sys lists the clients (and their connections) that came back; other owners are gone."""
        conns = {bytes(client): {0, *open_conns} for client, open_conns in live}  # conn 0: the client itself
        for task in list(self.tasks.values()):
            if task.owner is None or task.closed:
                continue
            client, conn = bytes(task.owner[0]), task.owner[1]
            if client not in conns:
                await self._gone(bus.Gone(client=client, conn=None, release=True))
            elif conn not in conns[client]:
                await self._gone(bus.Gone(client=client, conn=conn))

    async def _drop_all_tasks(self, why: str) -> None:
        for task in list(self.tasks.values()):
            await self._exit_task(task, why)

    async def _gone(self, message: bus.Gone) -> None:
        """A client connection went away: stop its work, release ownership, exit tasks that asked for it.

        When a client process vanished without saying goodbye (`release`), its tasks go too: they
        would hold task slots until a setup reclaimed them (spec §5.4)."""
        def matches(key: tuple[Any, Any] | bus.Owner | None) -> bool:
            return key is not None and key[0] == message.client and (message.conn is None or key[1] == message.conn)

        cancel = bool(self.settings["tcp.cancel_on_disconnect"])
        self.streams.drop_client(message.client, message.conn)
        for task in list(self.tasks.values()):
            owned = matches(task.owner)
            if owned:
                task.owner = None
                if task.exit_on_disconnect or message.release:
                    await self._exit_task(task, "owner disconnected")
                    continue
            if cancel:
                for job in [j for j in task.queue if matches(j.conn_key)]:
                    task.queue.remove(job)
                    assert job.route is not None  # conn_key comes from the route
                    self._reply(job.route, None)
                if task.current is not None and matches(task.current.conn_key):
                    await self._stop_job(task.current)
