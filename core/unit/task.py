"""A unit's tasks and their jobs (spec §8, §18.1): what one work_id holds and the work queued for it.

A `Task[S]` carries the unit's own per-task state as one typed object `S` (a dataclass each unit
declares), returned by the unit's `load`. The queue is the task's: units change it only through the
methods here, so the limits (spec §18.1) hold everywhere.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Generic, TypeVar

from core import bus
from core.envelope import Response, stream_data
from core.errors import ErrorCode, UnitError
from core.ids import ObjectType
from core.manifest import Manifest

if TYPE_CHECKING:
    from core.unit.base import Unit

log = logging.getLogger(__name__)

CHAIN_QUEUE = 64  # chain inputs waiting per task; the oldest is dropped beyond this (spec §18.1)

S = TypeVar("S")
Connection = tuple[bytes, int]  # (client identity, conn): who a job's stream belongs to, for drop-on-leave
Progress = Callable[..., None]  # progress(percent, stage="loading"), thread-safe


class Job(Generic[S]):
    """One unit of work for a task: a client's inference or an input from a linked task.

    Its methods may be called from the worker thread; they hand messages to the event loop.
    """

    def __init__(self, unit: "Unit[S]", task: "Task[S]", request_id: str, object: str, payload: Any,
                 route: bus.Route | None = None, source: str | None = None):
        self.unit = unit
        self.task = task
        self.request_id = request_id
        self.object = object
        self.payload = payload
        self.route = route  # set for a client's request: its answer goes there
        self.source = source  # upstream work_id (or a published source such as sys.pcm) for chain jobs
        self.cancel = threading.Event()
        self.index = 0
        self.finished = False  # a finish:true chunk went out
        self.done: asyncio.Future[None] | None = None

    @property
    def connection(self) -> Connection | None:
        """The sender's connection, for cancel-on-disconnect; None for chain jobs."""
        return (self.route.client, self.route.conn) if self.route is not None else None

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
class Task(Generic[S]):
    """One configured instance of a unit (a work_id). The unit's own state is `state`, set by its `load`."""
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
    progress: Progress | None = None  # set during the setup when the client asked for progress
    setup_note: str = ""  # a setting `load` substituted, said in the setup's reply (spec §8.1)
    queue: collections.deque[Job[S]] = field(default_factory=collections.deque)
    current: Job[S] | None = None
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    worker: asyncio.Task[None] | None = None
    closed: bool = False
    state: S = field(init=False, repr=False)  # absent until `load` returned it

    @property
    def stream_output(self) -> bool:
        return ObjectType.parse(self.response_format).stream

    @property
    def number(self) -> int:
        """The work_id's number: tasks are listed in the order sys allocated them."""
        return int(self.work_id.rsplit(".", 1)[1])

    def info(self) -> dict[str, Any]:
        return {"enoutput": self.enoutput, "inputs": list(self.inputs), "model": self.model,
                "response_format": self.response_format,
                "output_type": self.manifest.output_type, "state": "paused" if self.paused else "ready"}

    @property
    def user_jobs(self) -> int:
        return sum(1 for j in self.queue if j.route is not None)

    @property
    def idle(self) -> bool:
        return self.current is None and not self.queue

    def put(self, job: Job[S], limit: int, continuing: bool = False) -> None:
        """Queue a job for the worker. User jobs beyond `limit` get -32 unless `continuing` (the rest of a
        stream already accepted: never refused half-way); chain jobs beyond CHAIN_QUEUE drop the oldest."""
        if job.route is not None:
            if not continuing and self.user_jobs >= limit:
                raise UnitError(ErrorCode.QUEUE_FULL, f"{self.user_jobs} requests queued on {self.work_id}")
        else:
            chain = [j for j in self.queue if j.route is None]
            if len(chain) >= CHAIN_QUEUE:
                self.queue.remove(chain[0])
                log.warning("%s: chain input from %s dropped, the task cannot keep up", self.work_id, chain[0].source)
        self.queue.append(job)
        self.wakeup.set()

    def drop_chain_jobs(self) -> None:
        """Forget the queued inputs from linked tasks (barge-in, pause); clients' requests stay queued."""
        for job in [j for j in self.queue if j.route is None]:
            self.queue.remove(job)

    def cancel_current(self, chain_only: bool = False) -> None:
        """Ask the running job to stop (it checks job.cancelled); with chain_only, only a chain job."""
        if self.current is not None and not (chain_only and self.current.route is not None):
            self.current.cancel.set()
