"""The Unit base: what every unit process shares (spec §8, §10.5, §12, §18).

A unit author subclasses `Unit[S]`, declares its setup keys and which inputs it takes, and implements
`load` (once per task, in a worker thread, returning the task's state `S`) and `on_inference` / `on_chain`
(per job, in the task's worker thread). The base does the bus (core/unit/session.py), routing, the action
table, per-task queues (core/unit/task.py), streamed-input reassembly, base64/WAV decoding and links
(core/unit/inputs.py), ownership, cancellation and one error boundary. Nothing here touches zmq directly.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from typing import Any, Callable, ClassVar, Coroutine, Generic

from core import bus, notify
from core.envelope import NONE, Request, Response, error_reply, reply
from core.errors import ErrorCode, UnitError
from core.ids import ObjectType, WorkId, is_task_ref, split_board
from core.manifest import ManifestStore, merge_params
from core.runtime import limit_malloc_arenas, return_memory_to_os, trim_loop
from core.settings import Settings, start_process
from core.streams import StreamAssembler
from core.supervisor import RESTART_EXIT
from core.unit.inputs import check_link, check_source, inference_payload
from core.unit.session import Session
from core.unit.task import Job, S, Task

log = logging.getLogger(__name__)

BASE_ACTIONS = ("setup", "inference", "link", "unlink", "pause", "work", "exit", "taskinfo")
JOB_STOP_WAIT_S = 10.0


def restartable() -> bool:
    """Whether something starts this process again when it exits: `unitbus up` or systemd."""
    return bool(os.environ.get("UNITBUS_SUPERVISED") or os.environ.get("INVOCATION_ID"))


class Unit(Session, Generic[S]):
    """Subclass this. Class attributes describe the unit; the methods under "hooks" are what it overrides."""

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
    # Input tokens that subscribe to a published source: {"sys": "sys.pcm"} for the microphone.
    subscribes: ClassVar[dict[str, str]] = {}
    max_queue_default: ClassVar[int] = 3
    # False: a client's stream chunks go to `on_stream_chunk` as they come (tts speaks each sentence).
    reassemble_streams: ClassVar[bool] = True
    needs_text: ClassVar[bool] = True  # inference data is text (else audio bytes)
    # Give freed memory back to the OS when a job leaves the task idle: for units whose jobs allocate
    # and free large tensors (a transcription, a sentence), not for those that run every 80 ms.
    trim_when_idle: ClassVar[bool] = False
    # True: a setup creates a task (a work_id); False: it configures the process (`on_setup`).
    tasks_per_setup: ClassVar[bool] = True

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.settings = settings
        self.max_tasks = int(settings.get(f"{self.name}.max_tasks", 1))
        self.manifests = ManifestStore(settings)
        self.tasks: dict[str, Task[S]] = {}
        self.streams = StreamAssembler(int(settings["framing.max_stream_bytes"]), float(settings["timeouts.stream_idle_s"]))
        self._models: dict[Any, Any] = {}
        self._models_lock = threading.Lock()
        self._background: set[asyncio.Task[Any]] = set()
        self.subscribers: dict[str, int] = {}  # tasks subscribed to each source this unit publishes
        self.exit_code = 0
        self._stop: asyncio.Event | None = None

    # hooks (override) --------------------------------------------------------------------------
    def load(self, task: Task[S]) -> S:
        """Worker thread: load or share the model for a new task and return its state; raise UnitError
        to refuse the setup. May set task.setup_note, and report through task.progress when set."""
        return None  # type: ignore[return-value]  # a unit without per-task state is Unit[None]

    def setup_data(self, name: str, data: dict[str, Any]) -> dict[str, Any]:
        """Event loop: a setup's data as the unit reads it under `name` (whisper's defaults under asr)."""
        return data

    async def on_setup(self, request: Request, route: bus.Route) -> Response:
        """Event loop (tasks_per_setup False): a setup that configures the process instead of creating a
        task (the audio unit's devices); answer it or raise UnitError."""
        raise UnitError(ErrorCode.NO_UNIT_ACTION)

    def on_stream_chunk(self, task: Task[S], request: Request, route: bus.Route) -> Job[S] | None:
        """Event loop (reassemble_streams False): one chunk of a client's input stream. Queue a job with
        `enqueue` and return it, or return None when there is nothing to do yet (the base answers)."""
        raise UnitError(ErrorCode.NO_UNIT_ACTION)

    def on_inference(self, job: Job[S]) -> None:
        """Worker thread: answer a client's inference (job.payload is text, or bytes for audio)."""
        raise UnitError(ErrorCode.NO_UNIT_ACTION)

    def on_chain(self, job: Job[S]) -> None:
        """Worker thread: handle an output of a linked task (job.payload is its response dict or PCM bytes)."""

    def chain_arrived(self, task: Task[S], source: str, response: dict[str, Any] | None, binary: bytes | None) -> bool:
        """Event loop: a chain input arrived. Return True when handled here (e.g. barge-in), else it is queued."""
        return False

    def on_pause(self, task: Task[S]) -> None:
        """Event loop: after the running job was stopped."""

    def on_work(self, task: Task[S]) -> None:
        """Event loop: `work` resumes the task."""

    def on_exit(self, task: Task[S]) -> None:
        """Event loop: the task is going away; release what it holds."""

    def describe(self, task: Task[S]) -> dict[str, Any]:
        """Event loop: what taskinfo and lstask show; units may add keys (clients ignore extra keys)."""
        return task.info()

    async def on_action(self, task: Task[S] | None, request: Request, route: bus.Route,
                        binary: bytes | None) -> Response | None:
        """Event loop: a unit-specific action (extra_actions)."""
        raise UnitError(ErrorCode.NO_UNIT_ACTION)

    def on_subscribers(self, source: str, count: int) -> None:
        """Event loop: how many tasks now subscribe to a source this unit publishes (published_sources)."""

    def on_control(self, message: bus.Control) -> None:
        """Event loop: housekeeping from sys that the base does not handle; override if needed."""

    def on_sink(self, source: str, response: dict[str, Any] | None, binary: bytes | None) -> None:
        """Event loop: something published under a source this unit declared as `sink:<source>`."""

    # helpers for units -------------------------------------------------------------------------
    def shared_model(self, key: Any, loader: Callable[[], Any]) -> Any:
        """A model loaded once per process and shared by every task that uses it (spec §18.4)."""
        with self._models_lock:
            if key not in self._models:
                self._models[key] = loader()
            return self._models[key]

    def chain_job(self, task: Task[S], source: str, payload: Any, object: str = NONE) -> Job[S]:
        return Job(self, task, task.last_request_id, object, payload, route=None, source=source)

    def enqueue(self, task: Task[S], job: Job[S], continuing: bool = False) -> None:
        """Queue a job for the task's worker. User jobs beyond max_queue get -32 (unless `continuing` an
        accepted stream); chain jobs drop the oldest."""
        task.put(job, int(task.params.get("max_queue", self.max_queue_default)), continuing)

    def drop_queued(self, task: Task[S], why: str) -> None:
        """Empty the task's queue: clients' requests are answered -CANCELLED with `why`, chain inputs dropped."""
        for job in list(task.queue):
            if job.route is not None:
                self._cancel_queued(task, job, why)
            else:
                task.queue.remove(job)

    # process -----------------------------------------------------------------------------------
    @classmethod
    def main(cls, argv: list[str] | None = None) -> None:
        limit_malloc_arenas()
        settings, _ = start_process(f"unitbus-{cls.name}", f"the unitbus {cls.name} unit", argv)
        unit = cls(settings)
        asyncio.run(unit.serve())
        sys.exit(unit.exit_code)

    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        stop = self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, stop.set)
        self.connect()
        self.hello()
        receiver = asyncio.create_task(self.receive_loop())
        beat = asyncio.create_task(self.heartbeat_loop())
        watchdog = asyncio.create_task(notify.watchdog_loop())
        trimmer = asyncio.create_task(trim_loop())
        stopper = asyncio.create_task(stop.wait())
        await self.registered.wait()  # READY=1 only once sys knows us (spec §19)
        notify.ready(f"{self.name} unit on {self.endpoint}")
        await asyncio.wait([receiver, beat, stopper], return_when=asyncio.FIRST_COMPLETED)
        notify.notify("STOPPING=1")
        for task in list(self.tasks.values()):
            await self._exit_task(task, "unit stopping")
        for t in (receiver, beat, watchdog, trimmer, stopper, *self._background):
            t.cancel()
        await asyncio.gather(receiver, beat, watchdog, trimmer, stopper, return_exceptions=True)
        self.close()

    def actions(self) -> list[str]:
        return [a for a in (*BASE_ACTIONS, *self.extra_actions) if a not in self.no_task_actions]

    def registered_again(self, why: str) -> None:
        """Register every task again, so a new sys recovers them (spec §5.4).

        The requests in flight died with the old sys and their clients have answered them, so the
        unit stops their work (an answer still goes out, for a sys that only lost us for a while)."""
        for task in self.tasks.values():
            self._announce(task)
        for task in self.tasks.values():
            for job in [j for j in task.queue if j.route is not None]:
                self._cancel_queued(task, job, why)
            if task.current is not None and task.current.route is not None:
                task.current.cancel.set()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def dispatch(self, message: bus.Message) -> None:
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
        elif message.op == "live":
            await self._drop_stale_owners(message.data)
        elif message.op == "subscribers" and isinstance(message.data, dict):
            for source, count in message.data.items():
                self.subscribers[str(source)] = int(count)
                self.on_subscribers(str(source), int(count))
        else:
            self.on_control(message)

    # requests ----------------------------------------------------------------------------------
    def _reply(self, route: bus.Route, response: Response | None, final: bool = True) -> None:
        self.send(bus.Msg(response=response.to_dict() if response else None, route=route, final=final))

    async def _request(self, message: bus.Req) -> None:
        """The error boundary: every request ends with an answer."""
        route = message.route or bus.Route(b"", 0, 0)
        try:
            request = Request.from_dict(message.request)
        except (KeyError, TypeError):
            self._reply(route, error_reply("0", self.name, ErrorCode.JSON_FORMAT))
            return
        error_work_id = request.work_id
        try:
            if request.action == "setup":
                error_work_id = WorkId.parse(message.assigned or request.work_id).unit  # type: ignore[union-attr]
                if self.tasks_per_setup:
                    await self._setup(request, message, route)
                else:
                    self._reply(route, await self.on_setup(request, route))
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

    def _task(self, request: Request) -> Task[S]:
        task = self.tasks.get(request.work_id)
        if task is None:
            raise UnitError(ErrorCode.UNIT_NOT_EXIST)
        return task

    @staticmethod
    def _take_ownership(task: Task[S], route: bus.Route) -> None:
        if task.owner is None:
            task.owner = route.owner

    async def _control_action(self, request: Request, message: bus.Req, route: bus.Route) -> None:
        action = request.action
        work_id = WorkId.parse(request.work_id)
        if action in self.no_task_actions:
            raise UnitError(ErrorCode.NO_UNIT_ACTION)
        if action == "taskinfo" and work_id is not None and not work_id.is_task:
            # Every task of this process, whatever name it was set up under (tts and melotts share slots).
            ordered = sorted(self.tasks.values(), key=lambda t: t.number)
            self._reply(route, reply(request, data=[t.work_id for t in ordered], object=f"{work_id.unit}.tasklist"))
            return
        if action in self.extra_actions:
            found = self.tasks.get(request.work_id)
            response = await self.on_action(found, request, route, message.binary)
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
        epoch = self.epoch
        assigned = message.assigned or ""
        name = assigned.split(".")[0] or request.unit
        data = request.data
        if not isinstance(data, dict):
            raise UnitError(ErrorCode.JSON_FORMAT, "setup data must be an object")
        data = self.setup_data(name, data)
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
        task: Task[S] = Task(work_id=assigned, name=name, model=model, manifest=manifest, params=params,
                             response_format=str(params["response_format"]), inputs=[],
                             enoutput=bool(params["enoutput"]), owner=route.owner,
                             last_request_id=request.request_id, exit_on_disconnect=bool(params["exit_on_disconnect"]))
        for entry in inputs:
            if is_task_ref(entry):
                self._link(task, entry, snapshot)
            else:
                self._add_source(task, entry)
        published = (message.ctx or {}).get("sources", {})
        for source in self._published_inputs(task):
            if source not in published:
                raise UnitError(ErrorCode.RESOURCE_ALLOCATION, f"no unit publishes {source}")
            if published[source]:
                raise UnitError(ErrorCode.RESOURCE_ALLOCATION, str(published[source]))
        if params["progress"]:
            task.progress = lambda percent, stage="loading": self.send_threadsafe(bus.Msg(
                response=Response(request.request_id, name, f"{name}.setup.progress",
                                  {"stage": stage, "percent": int(percent)}).to_dict(), route=route))
        task.state = await asyncio.to_thread(self.load, task)
        task.progress = None
        if epoch != self.epoch:  # sys restarted during the load: the client was told its setup failed
            raise UnitError(ErrorCode.UNIT_CALL, "sys restarted during the setup; set up again")
        if len(self.tasks) >= self.max_tasks:  # another setup finished while this one loaded
            raise self._task_full()
        self.tasks[task.work_id] = task
        task.worker = asyncio.create_task(self._worker(task))
        self._announce(task)
        # load() may leave a note of a setting it substituted (spec §8.1: e.g. a wake word the model lacks).
        note = "; ".join(n for n in (note, task.setup_note, reclaimed) if n)
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
                   if t.owner is None and not t.upstream and t.work_id not in linked and t.idle]
        orphans.sort(key=lambda t: t.number)
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
                            for t in sorted(self.tasks.values(), key=lambda t: t.number))
        slots = "slot" if self.max_tasks == 1 else "slots"
        return UnitError(ErrorCode.TASK_FULL, f"{self.max_tasks} {self.name} {slots} held by {holders}")

    def _add_source(self, task: Task[S], entry: str) -> None:
        token, board = check_source(entry, self.input_sources, self.subscribes.values())
        if board is not None:  # another board's microphone (`sys.pcm@mic`), imported by the fleet bridge as a task
            task.upstream[entry] = token
        else:
            task.sources.add(token)
        task.inputs.append(entry)

    def _link(self, task: Task[S], upstream: Any, snapshot: dict[str, dict[str, Any]]) -> None:
        """Subscribe the task to an upstream task's outputs, checked against the unit and the manifests."""
        if isinstance(upstream, str) and upstream in task.upstream:
            return
        task.upstream[upstream] = check_link(task.work_id, upstream, self.name, self.link_kinds, task.manifest, snapshot)
        task.inputs.append(upstream)

    def _published_inputs(self, task: Task[S]) -> list[str]:
        return [self.subscribes[token] for token in sorted(task.sources) if token in self.subscribes]

    def subscriptions(self, task: Task[S]) -> list[str]:
        return [*task.upstream, *self._published_inputs(task)]

    def _announce(self, task: Task[S]) -> None:
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
        data: Any = request.data
        if message.binary is None and ObjectType.parse(request.object).stream:
            if not self.reassemble_streams:
                if self.on_stream_chunk(task, request, route) is None:
                    self._reply(route, None)  # nothing complete to say yet
                return
            data = self.streams.feed((route.client, route.conn), task.work_id, request.data)
            if data is None:
                self._reply(route, None)  # a chunk in the middle of a stream: nothing to say yet
                return
        payload = inference_payload(request.object, data, message.binary, self.needs_text)
        self.enqueue(task, Job(self, task, request.request_id, request.object, payload, route=route))

    def _chain(self, message: bus.Chain) -> None:
        local = split_board(message.src)[0]
        if local in self.subscribes.values():
            message.src = local  # another board's microphone is a microphone to the task that took it
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

    async def _worker(self, task: Task[S]) -> None:
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

    def _run_job(self, job: Job[S]) -> None:
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

    def _job_error(self, job: Job[S], exc: UnitError) -> None:
        response = error_reply(job.request_id, job.task.work_id, exc)
        if job.route is not None:
            self.send_threadsafe(bus.Msg(response=response.to_dict(), route=job.route))
        elif job.task.owner is not None:
            self.send_threadsafe(bus.Msg(response=response.to_dict(), owner=job.task.owner))

    # stopping work -----------------------------------------------------------------------------
    async def _stop_job(self, job: Job[S]) -> None:
        job.cancel.set()
        if job.done is not None:
            try:
                await asyncio.wait_for(asyncio.shield(job.done), JOB_STOP_WAIT_S)
            except asyncio.TimeoutError:
                log.error("%s: job %s did not stop within %.0f s", job.task.work_id, job.request_id, JOB_STOP_WAIT_S)

    def _cancel_queued(self, task: Task[S], job: Job[S], detail: str) -> None:
        task.queue.remove(job)
        if job.route is not None:
            self._reply(job.route, error_reply(job.request_id, task.work_id, ErrorCode.CANCELLED, detail))

    async def _pause(self, task: Task[S], data: Any) -> None:
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

    async def _exit_task(self, task: Task[S], why: str) -> None:
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
            client, conn = bytes(task.owner.client), task.owner.conn
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
        def matches(key: tuple[bytes, int] | None) -> bool:
            return key is not None and key[0] == message.client and (message.conn is None or key[1] == message.conn)

        cancel = bool(self.settings["tasks.cancel_on_disconnect"])
        self.streams.drop_client(message.client, message.conn)
        for task in list(self.tasks.values()):
            if matches(task.owner):
                task.owner = None
                if task.exit_on_disconnect or message.release:
                    await self._exit_task(task, "owner disconnected")
                    continue
            if cancel:
                for job in [j for j in task.queue if matches(j.connection)]:
                    task.queue.remove(job)
                    assert job.route is not None  # a connection comes from the route
                    self._reply(job.route, None)
                if task.current is not None and matches(task.current.connection):
                    await self._stop_job(task.current)
