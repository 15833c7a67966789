"""The sys broker: unit registry and heartbeats, work_id allocation, per-request routing, links (spec §5, §6).

Modelled on the zguide Majordomo broker: explicit unit and client records, heartbeat constants in
core.bus, and one dispatch step that pairs a request with a live unit or answers it at once.
"""
from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Coroutine

from core import bus, rundir
from core.envelope import Request, Response, error_reply
from core.errors import ErrorCode
from core.ids import WorkId
from core.settings import Settings
from core.sys.fleet import FLEET_UNIT, IMPORT, IMPORT_DONE, IMPORTED, fleet_timeout, remote_inputs, wants_fleet
from core.sys.links import LinkDirectory

log = logging.getLogger(__name__)

TICK_S = 0.1


@dataclass(eq=False)
class UnitRecord:
    identity: bytes
    name: str
    names: list[str]
    actions: set[str]
    version: str
    features: list[str]
    pid: int = 0
    last_seen: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class ClientRecord:
    identity: bytes
    name: str
    features: list[str]
    conns: set[int] = field(default_factory=set)  # connections known open: from its hello and its requests
    last_seen: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class TaskRecord:
    work_id: str
    unit: UnitRecord
    info: dict[str, Any]


@dataclass
class Origin:
    """Who asked: where a reply goes."""
    client: bytes
    tag: int
    conn: int


@dataclass
class Inflight:
    origin: Origin
    request: Request
    unit: UnitRecord | None
    timeout: float | None
    error_work_id: str  # the work_id an error answer carries (bare unit name for setup, spec §4.4)
    rewrite: dict[str, Any] | None = None  # unit_call: reply as sys, echoing the request's object
    assigned: str | None = None  # the work_id a setup will create
    imports: list[str] = field(default_factory=list)  # remote sources brought here for it (a setup or link)
    started: float = field(default_factory=time.monotonic)


class Broker:
    def __init__(self, settings: Settings):
        from core.sys.actions import SysActions  # actions need the broker type; keep the import one-way

        self.settings = settings
        self.endpoint = settings.bus_endpoint()
        self.key = settings.bus_key()
        self.key_file = settings.run_dir() / rundir.KEY_FILE
        self.heartbeat_s = float(settings["bus.heartbeat_s"])
        self.liveness_s = float(settings["bus.liveness_s"])
        self.units: dict[str, UnitRecord] = {}  # served name -> record
        self.workers: dict[bytes, UnitRecord] = {}
        self.clients: dict[bytes, ClientRecord] = {}
        self.tasks: dict[str, TaskRecord] = {}
        self.links = LinkDirectory()
        self.inflight: dict[tuple[bytes, int], Inflight] = {}
        self.next_number = int(settings["work_id.start"])
        self.sys_actions = SysActions(self)
        self.started = time.time()
        self.started_at = time.monotonic()
        self._ctx = bus.Context()
        self.sock: bus.RouterSocket | None = None
        self._background: set[asyncio.Task[Any]] = set()
        # Sources units publish (bus.Hello.sources): the publisher and "" when offered, else why not;
        # and the subscriber count each publisher was last told.
        self.sources: dict[str, tuple[UnitRecord, str]] = {}
        self.subscriber_counts: dict[str, int] = {}
        self._proxy_subscribers: dict[str, int] = {}  # the fleet bridge's link ends -> their subscriber counts
        self.importing: dict[int, tuple[bytes, bus.Req]] = {}  # setups/links waiting for remote sources
        self._import_keys = itertools.count(1)
        self.abandoned: set[str] = set()  # setups answered with a timeout: their tasks are not wanted
        self._hello_sent: dict[bytes, float] = {}  # unknown peers asked to introduce themselves, and when
        self._refused: dict[bytes, float] = {}  # peers whose hello was refused, and when (logged once each)
        self._live_told = False  # whether units were told which clients came back (after a restart)
        self.ready = asyncio.Event()

    # lifecycle ---------------------------------------------------------------------------------
    async def run(self) -> None:
        self.sock = self._ctx.router(self.endpoint)
        log.info("sys listening on %s", self.endpoint)
        self.ready.set()
        try:
            await bus.wait_first(self._receive_loop(), self._timer_loop(), self._disconnect_loop())
        finally:
            self.close()

    def close(self) -> None:
        for task in self._background:
            task.cancel()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._ctx.term()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # sending -----------------------------------------------------------------------------------
    def send_to_client(self, identity: bytes, message: bus.Message) -> bool:
        try:
            assert self.sock is not None
            self.sock.send(identity, message)
            return True
        except bus.PeerGone:
            self._client_gone(identity)
            return False

    def send_to_unit(self, record: UnitRecord, message: bus.Message) -> bool:
        try:
            assert self.sock is not None
            self.sock.send(record.identity, message)
            return True
        except bus.PeerGone:
            self._unit_dead(record, f"unit {record.name} stopped responding")
            return False

    def answer(self, origin: Origin, response: Response | None, final: bool = True) -> None:
        self.send_to_client(origin.client, bus.Msg(response=response.to_dict() if response else None,
                                                   final=final, tag=origin.tag, conn=origin.conn))

    def answer_error(self, origin: Origin, request: Request, code: ErrorCode, detail: str | None = None,
                     work_id: str | None = None) -> None:
        self.answer(origin, error_reply(request.request_id, work_id or request.work_id, code, detail))

    # receiving ---------------------------------------------------------------------------------
    async def _receive_loop(self) -> None:
        assert self.sock is not None
        await self.sock.serve(self._handle_safely)

    def _handle_safely(self, identity: bytes, message: bus.Message) -> None:
        try:
            self.handle(identity, message)
        except Exception:
            log.exception("error while handling %s", type(message).__name__)

    def handle(self, identity: bytes, message: bus.Message) -> None:
        now = time.monotonic()
        unit = self.workers.get(identity)
        if unit is not None:
            unit.last_seen = now
        client = self.clients.get(identity)
        if client is not None:
            client.last_seen = now
        if isinstance(message, bus.Hello):
            self._hello(identity, message)
        elif unit is None and client is None:
            self._ask_hello(identity, now)
        elif isinstance(message, bus.Heartbeat):
            pass
        elif isinstance(message, bus.Req):
            if client is not None:
                client.conns.add(message.conn)
            self._request(identity, message)
        elif isinstance(message, bus.Msg) and unit is not None:
            self._unit_message(unit, message)
        elif isinstance(message, bus.TaskEvent) and unit is not None:
            self._task_event(unit, message)
        elif isinstance(message, bus.Gone) and unit is not None:
            self._unit_dead(unit, f"unit {unit.name} stopped")  # its goodbye: a successor may register at once
        elif isinstance(message, bus.Gone) and message.conn is None:
            self._client_gone(identity, release=False)  # a goodbye: its tasks stay
        elif isinstance(message, bus.Gone):
            if client is not None:
                client.conns.discard(message.conn)
            self.sys_actions.streams.drop_client(identity, message.conn)
            for record in set(self.workers.values()):
                self.send_to_unit(record, bus.Gone(client=identity, conn=message.conn))
        elif isinstance(message, bus.Control) and message.op == IMPORTED and unit is not None:
            self._imported(message.data)
        elif isinstance(message, bus.Control):
            self.sys_actions.control_from_peer(identity, message)
        else:
            log.warning("unexpected %s from %r", type(message).__name__, identity)

    def _ask_hello(self, identity: bytes, now: float) -> None:
        """A peer sys does not know (from before a restart, or forgotten): ask it to introduce itself.

        Once per heartbeat period: a unit streaming into a restarted sys sends many messages before
        its hello arrives, and each would otherwise make it register (and cancel its work) again."""
        if now - self._hello_sent.get(identity, -self.heartbeat_s) < self.heartbeat_s:
            return
        self._hello_sent[identity] = now
        assert self.sock is not None
        try:
            self.sock.send(identity, bus.Hello(role="sys", name="sys"))
        except bus.PeerGone:
            pass

    def _hello(self, identity: bytes, hello: bus.Hello) -> None:
        self._hello_sent.pop(identity, None)
        offered = hello.key.encode("utf-8", "surrogatepass") if isinstance(hello.key, str) else b""
        if not hmac.compare_digest(offered, self.key.encode()):
            # Not a process of this stack (it cannot read the run dir's key): never registered.
            if identity not in self._refused:
                log.warning("hello from %r (%s %s, pid %s) refused: wrong registration key", identity,
                            hello.role, hello.name, hello.pid)
            self._refused[identity] = time.monotonic()
            self.send_to_peer(identity, bus.Control("refused", f"wrong registration key (the key is in "
                                                               f"{self.key_file}, readable by sys's user only)"))
            return
        if hello.role == "unit":
            self._unit_hello(identity, hello)
        else:
            self.clients[identity] = ClientRecord(identity, hello.name, hello.features, set(hello.conns))
            self.send_to_client(identity, bus.Heartbeat())

    def _unit_hello(self, identity: bytes, hello: bus.Hello) -> None:
        names = hello.names or [hello.name]
        again = self.workers.get(identity)
        if again is not None:
            # The same process registers again: it lost sys for a while, and stopped what it was doing.
            self._fail_inflight(again, f"unit {again.name} lost its connection to sys")
        for name in names:
            old = self.units.get(name)
            if old is not None and old is not again:
                self.send_to_unit(old, bus.Heartbeat())  # a vanished process fails this at once and is dropped
            old = self.units.get(name)
            if old is not None and old is not again:
                # Never let a newcomer take a live unit's name (and its tasks): it may ask again later.
                why = f"unit {name} is already served by a live process; registration refused"
                if identity not in self._refused:
                    log.warning("%s (pid %s)", why, hello.pid)
                self._refused[identity] = time.monotonic()
                self.send_to_peer(identity, bus.Control("refused", why))
                return
        record = again or UnitRecord(identity, hello.name, names, set(hello.actions), hello.version, hello.features,
                                     hello.pid)
        record.names, record.actions, record.version, record.features = names, set(hello.actions), hello.version, \
            hello.features
        self.workers[identity] = record
        for name in record.names:
            self.units[name] = record
        log.info("unit %s (%s) registered, pid %s", hello.name, ",".join(record.names), hello.pid)
        self.send_to_unit(record, bus.Heartbeat())
        self._forget_sources(record)
        for source, why in (hello.sources if isinstance(hello.sources, dict) else {}).items():
            self.sources[str(source)] = (record, str(why))
        self._update_subscribers(registered=record)
        if self._live_told:
            self.send_to_unit(record, self._live_clients())

    def send_to_peer(self, identity: bytes, message: bus.Message) -> None:
        """To a peer that is not registered (a refusal): a vanished one is simply not told."""
        assert self.sock is not None
        try:
            self.sock.send(identity, message)
        except bus.PeerGone:
            pass

    def _live_clients(self) -> bus.Control:
        return bus.Control("live", [[c.identity, sorted(c.conns)] for c in self.clients.values()])

    # dispatch (spec §6) ------------------------------------------------------------------------
    def _request(self, identity: bytes, message: bus.Req, imported: bool = False) -> None:
        origin = Origin(identity, message.tag, message.conn)
        try:
            request = Request.from_dict(message.request)
        except (KeyError, TypeError):
            self.answer(origin, error_reply("0", "sys", ErrorCode.JSON_FORMAT))
            return
        if wants_fleet(request):
            self._forward_fleet(origin, request, message.binary)
            return
        if not imported and (missing := [s for s in remote_inputs(request) if s not in self.tasks]):
            self._import(origin, request, message, missing)
            return
        work_id = WorkId.parse(request.work_id)
        if request.action == "inference":
            task = self.tasks.get(request.work_id) if work_id and work_id.is_task else None
            if task is None:
                record = self.units.get(work_id.unit) if work_id and not work_id.is_task else None
                no_action = record is not None and "inference" not in record.actions  # audio (spec §9)
                self.answer_error(origin, request, ErrorCode.NO_UNIT_ACTION if no_action else ErrorCode.INFERENCE_PUSH)
                return
            self._forward(origin, request, task.unit, None, message.binary)
            return
        if work_id is not None and work_id.unit == "sys":
            self.sys_actions.dispatch(origin, request, message.binary)
            return
        record = self.units.get(work_id.unit) if work_id else None
        if record is None:
            self.answer_error(origin, request, ErrorCode.UNIT_CALL)
            return
        if request.action not in record.actions:
            self.answer_error(origin, request, ErrorCode.NO_UNIT_ACTION)
            return
        assert work_id is not None
        if request.action == "setup":
            assigned = f"{work_id.unit}.{self.next_number}"
            self.next_number += 1
            self._forward(origin, request, record, float(self.settings["timeouts.setup_s"]), message.binary,
                          assigned=assigned, error_work_id=work_id.unit)
            return
        if work_id.is_task and request.work_id not in self.tasks:
            self.answer_error(origin, request, ErrorCode.UNIT_NOT_EXIST)
            return
        self._forward(origin, request, record, float(self.settings["timeouts.control_s"]), message.binary)

    def _import(self, origin: Origin, request: Request, message: bus.Req, sources: list[str]) -> None:
        """A setup or link naming sources on other boards: the fleet bridge brings them here first, as its
        own tasks named like them (`asr.1001@mic`), which the unit then links to as to local ones."""
        record = self.units.get(FLEET_UNIT)
        if record is None:
            self.answer_error(origin, request, ErrorCode.LINK_FALSE,
                              f"{', '.join(sources)}: this board is not in a fleet (set fleet.url)")
            return
        key = next(self._import_keys)
        self.importing[key] = (origin.client, message)
        self.send_to_unit(record, bus.Control(IMPORT, {"key": key, "sources": sources, "client": origin.client,
                                                       "conn": origin.conn, "made_by": request.request_id}))

    def _imported(self, data: Any) -> None:
        key = data.get("key") if isinstance(data, dict) else None
        parked = self.importing.pop(key, None) if isinstance(key, int) else None
        if parked is None:
            return
        identity, message = parked
        error = data.get("error")
        if error:
            origin = Origin(identity, message.tag, message.conn)
            request = Request.from_dict(message.request)
            self.answer_error(origin, request, ErrorCode.LINK_FALSE, str(error))
            return
        self._request(identity, message, imported=True)
        entry = self.inflight.get((identity, message.tag))
        if entry is not None and entry.request.action in ("setup", "link"):
            entry.imports = list(data.get("sources") or [])
        else:
            self._imports_done(data.get("sources"))

    def _imports_done(self, sources: Any) -> None:
        """The request that needed them is over: the fleet bridge lets go of those no task took."""
        record = self.units.get(FLEET_UNIT)
        if record is not None and sources:
            self.send_to_unit(record, bus.Control(IMPORT_DONE, {"sources": sources}))

    def _forward_fleet(self, origin: Origin, request: Request, binary: bytes | None) -> None:
        record = self.units.get(FLEET_UNIT)
        if record is None:
            self.answer_error(origin, request, ErrorCode.UNIT_CALL,
                              "this board is not in a fleet (set fleet.url, see protocol.md \"The fleet\")")
            return
        self._forward(origin, request, record, fleet_timeout(request, self.settings), binary)

    def _forward(self, origin: Origin, request: Request, record: UnitRecord, timeout: float | None,
                 binary: bytes | None, assigned: str | None = None, error_work_id: str | None = None,
                 rewrite: dict[str, Any] | None = None) -> None:
        key = (origin.client, origin.tag)
        self.inflight[key] = Inflight(origin, request, record, timeout, error_work_id or request.work_id, rewrite,
                                      assigned=assigned)
        ctx = {"tasks": self.task_snapshot(), "sources": self.source_table()} if request.action in ("setup", "link") else None
        self.send_to_unit(record, bus.Req(tag=origin.tag, conn=origin.conn, request=request.to_dict(),
                                          route=bus.Route(origin.client, origin.tag, origin.conn), assigned=assigned,
                                          ctx=ctx, binary=binary))

    def source_table(self) -> dict[str, str]:
        """Every source a unit registered: "" when it is published, else why it is not."""
        return {source: why for source, (_, why) in self.sources.items()}

    def task_snapshot(self) -> dict[str, dict[str, Any]]:
        return {wid: {"unit": rec.unit.name, **rec.info} for wid, rec in self.tasks.items()}

    # from units --------------------------------------------------------------------------------
    def _unit_message(self, unit: UnitRecord, message: bus.Msg) -> None:
        if message.route is not None:
            key = (message.route.client, message.route.tag)
            entry = self.inflight.get(key)
            if entry is not None and entry.unit is unit:
                if message.final:
                    del self.inflight[key]
                    self._imports_done(entry.imports)
                if message.response is not None:
                    response = message.response
                    if entry.rewrite:
                        response = {**response, **entry.rewrite}
                    self.send_to_client(entry.origin.client, bus.Msg(response=response, final=message.final,
                                                                     tag=entry.origin.tag, conn=entry.origin.conn))
                elif message.final:
                    self.send_to_client(entry.origin.client, bus.Msg(final=True, tag=entry.origin.tag,
                                                                     conn=entry.origin.conn))
        elif message.owner is not None and message.response is not None:
            client, conn = message.owner
            if client in self.clients:
                self.send_to_client(client, bus.Msg(response=message.response, conn=conn))
        if message.publish is not None:
            self.publish(message.publish, message.response, message.binary)

    def publish(self, source: str, response: dict[str, Any] | None, binary: bytes | None) -> None:
        sink = f"sink:{source}"
        record: UnitRecord | None
        for record in list(self.workers.values()):
            if sink in record.features:
                self.send_to_unit(record, bus.Chain(src=source, dst=[], response=response, binary=binary))
        subscribers = self.links.subscribers(source)
        if not subscribers:
            return
        by_unit: dict[bytes, list[str]] = {}
        for work_id in subscribers:
            task = self.tasks.get(work_id)
            if task is not None:
                by_unit.setdefault(task.unit.identity, []).append(work_id)
        for identity, dst in by_unit.items():
            record = self.workers.get(identity)
            if record is not None:
                self.send_to_unit(record, bus.Chain(src=source, dst=sorted(dst), response=response, binary=binary))

    def _task_event(self, unit: UnitRecord, event: bus.TaskEvent) -> None:
        if event.op == "up" and event.work_id in self.abandoned:
            # Its setup was answered with a timeout; nobody knows this task: have the unit drop it.
            self.abandoned.discard(event.work_id)
            exit_request = Request("0", event.work_id, "exit")
            self.send_to_unit(unit, bus.Req(tag=0, conn=0, request=exit_request.to_dict(), route=bus.Route(b"", 0, 0)))
            return
        if event.op == "up":
            parsed = WorkId.parse(event.work_id)
            if parsed is not None and parsed.number is not None and parsed.number >= self.next_number:
                self.next_number = parsed.number + 1  # a task a restarted sys recovers: numbers never repeat
            self.tasks[event.work_id] = TaskRecord(event.work_id, unit, event.info)
            self.links.set_subscriptions(event.work_id, event.subscribe)
        elif event.op == "down":
            if event.work_id in self.tasks and isinstance(event.info.get("ended"), str):
                self._tell_link_owner(self.tasks[event.work_id], event.info["ended"])
            self._drop_task(event.work_id)
        self._update_subscribers()

    def _drop_task(self, work_id: str) -> None:
        if self.tasks.pop(work_id, None) is None:
            return
        self.links.remove(work_id)
        for record in set(self.workers.values()):
            self.send_to_unit(record, bus.TaskEvent(op="down", work_id=work_id))

    def _update_subscribers(self, registered: UnitRecord | None = None) -> None:
        """Tell each publisher how many tasks subscribe to its sources, when that changed (and all of
        them to a unit that just registered): the audio unit captures only while someone listens."""
        self._update_proxy_subscribers()
        changed: dict[bytes, tuple[UnitRecord, dict[str, int]]] = {}
        for source, (record, why) in self.sources.items():
            if why:
                continue
            count = len(self.links.subscribers(source))
            if record is registered or count != self.subscriber_counts.get(source):
                self.subscriber_counts[source] = count
                changed.setdefault(record.identity, (record, {}))[1][source] = count
        for record, counts in changed.values():
            self.send_to_unit(record, bus.Control("subscribers", counts))

    def _forget_sources(self, record: UnitRecord) -> None:
        for source in [s for s, (r, _) in self.sources.items() if r is record]:
            del self.sources[source]
            self.subscriber_counts.pop(source, None)

    def _update_proxy_subscribers(self) -> None:
        """The fleet bridge hears how many local tasks take each source it imported (0: it lets go)."""
        record = self.units.get(FLEET_UNIT)
        counts = {w: len(self.links.subscribers(w)) for w, t in self.tasks.items() if t.unit is record}
        if record is not None and counts != self._proxy_subscribers:
            self.send_to_unit(record, bus.Control("subscribers", counts))
        self._proxy_subscribers = counts

    # failures ----------------------------------------------------------------------------------
    def _unit_dead(self, record: UnitRecord, why: str) -> None:
        if self.workers.get(record.identity) is not record:
            return
        log.warning("%s: failing its requests and releasing its work_ids", why)
        del self.workers[record.identity]
        for name in record.names:
            if self.units.get(name) is record:
                del self.units[name]
        self._fail_inflight(record, why)
        if FLEET_UNIT in record.names:
            for key in list(self.importing):
                self._imported({"key": key, "error": f"{why} while linking across boards"})
        for work_id in [w for w, t in self.tasks.items() if t.unit is record]:
            self._tell_link_owner(self.tasks[work_id], why)
            self._drop_task(work_id)
        self._forget_sources(record)
        self._update_subscribers()

    def _tell_link_owner(self, task: TaskRecord, why: str) -> None:
        """A link across boards that ends with the fleet bridge: the connection that made it is told."""
        owner, ref = task.info.get("owner"), task.info.get("ref")
        if isinstance(owner, list) and len(owner) == 2 and owner[0] in self.clients and isinstance(ref, str):
            response = error_reply(str(task.info.get("made_by", "0")), ref, ErrorCode.UNIT_CALL,
                                   f"{why}: the link of {ref} ended")
            self.send_to_client(owner[0], bus.Msg(response=response.to_dict(), conn=owner[1]))

    def _fail_inflight(self, record: UnitRecord, why: str) -> None:
        for key, entry in list(self.inflight.items()):
            if entry.unit is record:
                del self.inflight[key]
                self.answer(entry.origin, error_reply(entry.request.request_id, entry.error_work_id,
                                                      ErrorCode.UNIT_CALL, why))

    def _client_gone(self, identity: bytes, release: bool = True) -> None:
        """A client left: said goodbye, or vanished (`release`: then its tasks are released too)."""
        if self.clients.pop(identity, None) is None:
            return
        log.info("client %r %s", identity, "gone: releasing its tasks" if release else "said goodbye")
        self.sys_actions.streams.drop_client(identity)
        for key in [k for k in self.inflight if k[0] == identity]:
            del self.inflight[key]
        for record in set(self.workers.values()):
            self.send_to_unit(record, bus.Gone(client=identity, conn=None, release=release))

    def cancel_all_inflight(self, detail: str) -> None:
        for key, entry in list(self.inflight.items()):
            if entry.unit is None:
                continue
            del self.inflight[key]
            self.answer(entry.origin, error_reply(entry.request.request_id, entry.error_work_id,
                                                  ErrorCode.CANCELLED, detail))

    # timers ------------------------------------------------------------------------------------
    async def _timer_loop(self) -> None:
        last_beat = 0.0
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            for key, entry in list(self.inflight.items()):
                if entry.timeout is not None and now - entry.started > entry.timeout:
                    del self.inflight[key]
                    self._imports_done(entry.imports)
                    if entry.assigned:
                        self.abandoned.add(entry.assigned)
                    what = (f"model load exceeded {entry.timeout:g} s" if entry.request.action == "setup"
                            else f"{entry.unit.name if entry.unit else 'sys'} did not answer "
                                 f"{entry.request.action} within {entry.timeout:g} s")
                    self.answer(entry.origin, error_reply(entry.request.request_id, entry.error_work_id,
                                                          ErrorCode.TIMEOUT, what))
            if now - last_beat >= self.heartbeat_s:
                last_beat = now
                self.probe_peers()
            for record in list(self.workers.values()):
                if now - record.last_seen > self.liveness_s:
                    self._unit_dead(record, f"unit {record.name} stopped responding")
            for identity, client in list(self.clients.items()):
                if now - client.last_seen > self.liveness_s:
                    self._client_gone(identity)
            if not self._live_told and now - self.started_at > self.liveness_s:
                # Every live client has introduced itself by now: units drop owners that did not come back.
                self._live_told = True
                for record in set(self.workers.values()):
                    self.send_to_unit(record, self._live_clients())
            for seen in (self._hello_sent, self._refused):
                for identity in [i for i, t in seen.items() if now - t > self.liveness_s]:
                    del seen[identity]

    def probe_peers(self) -> None:
        """A heartbeat to every peer; a send to a vanished peer fails at once (ROUTER_MANDATORY)."""
        for record in list(self.workers.values()):
            self.send_to_unit(record, bus.Heartbeat())
        for identity in list(self.clients):
            self.send_to_client(identity, bus.Heartbeat())

    async def _disconnect_loop(self) -> None:
        assert self.sock is not None
        while True:
            await self.sock.disconnected()
            # The routing table forgets the peer shortly after the event: probe a few times.
            for delay in (0.0, 0.05, 0.2, bus.PROBE_GRACE_S):
                await asyncio.sleep(delay)
                self.probe_peers()
