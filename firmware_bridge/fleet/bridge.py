"""The fleet bridge: one board's link to the others over NATS (protocol.md §21).

Two halves, both bus peers of this board's sys:
- import: the unit `fleet` to which sys hands every request for another board (`llm@kitchen`,
  `llm.1003@kitchen`, `llm@*`) and fleet-wide listings; each goes out as a NATS request whose answers
  come back on this bridge's one reply subscription and are passed to sys as that request's answers.
- export: micro service endpoints, `unitbus.board.<board>` whose requests become requests of a bus client
  of this board (one bus connection per remote connection), and one per llm model for `llm@*`, run on
  this board's own task pool.
A request's taker acknowledges it at once and answers or ticks while it is open: silence for
fleet.liveness_s ends the request with an error. Each board also announces itself every fleet.alive_s;
one silent for fleet.liveness_s is gone, and the connections it held here are closed (their inferences stop).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
import ssl
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from core import bus
from core.client import BusClient, Mailbox
from core.envelope import NONE, EnvelopeError, Request, Response, error_reply, reply, request_of
from core.errors import ErrorCode, UnitError
from core.ids import ANY_BOARD, BOARD_NAME, is_task_id, on_board, split_board
from core.microphone import PCM_SOURCE
from core.settings import Settings
from core.sys.fleet import FLEET_UNIT, IMPORT, IMPORT_DONE, IMPORTED
from firmware_bridge.fleet import wire
from firmware_bridge.pool import TaskPool

log = logging.getLogger(__name__)

VERSION = "0.1.0"
WAIT_STEP_S = 0.25  # how often a request waiting on a remote board checks that the board is still there
BUSY_RETRY_S = 0.25  # a load-balanced request that found its board busy is offered again this soon at the latest
NOT_HERE = (ErrorCode.UNIT_CALL, ErrorCode.UNIT_NOT_EXIST, ErrorCode.TASK_FULL)  # a balanced request goes on
ACK_AFTER_S = 0.1  # a request whose first answer takes longer is acknowledged on its own (else within that answer)


class NoResponders(Exception):
    """Nobody subscribes the subject (NATS answers at once)."""


class BoardGone(Exception):
    """The board answering a request went silent (or this board lost NATS)."""


class Replier:
    """The answers to one request from another board, numbered (`n`) so that one lost in a NATS server's
    failover shows as a gap; the acknowledgement (`accepted`) rides on the first answer, and while the
    request is open and quiet a tick goes out every fleet.alive_s, so that a lost last answer shows too."""

    def __init__(self, req, board: str, instance: str):
        self.req = req
        self.ack: dict | None = {"accepted": board, "i": instance}
        self.n = 0
        self.last_sent = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None
        self._ticking: asyncio.Task | None = None

    async def send(self, **body) -> None:
        if self.ack is not None:
            body.update(self.ack)
            self.ack = None
        body["n"] = self.n
        self.n += 1
        self.last_sent = time.monotonic()
        await self.req.respond(wire.pack(**body))

    def keep_alive(self, every: float) -> None:
        """Tick while the request is open and quiet; a timer, not a task, as most requests end sooner."""
        def due() -> None:
            # Quiet for half a period already: tick now, so that answers are never further apart than
            # 1.5 periods (a check finding it quiet for just under one would leave a gap of two).
            if self.ack is not None or time.monotonic() - self.last_sent >= every / 2:
                self._ticking = asyncio.ensure_future(self.send(tick=True))
            self._timer = loop.call_later(every, due)

        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(ACK_AFTER_S, due)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._ticking is not None:
            self._ticking.cancel()


@dataclass
class LinkEnd:
    """One end of a link across boards, a task of this bridge in sys's eyes (protocol.md §21.8).

    An import is the remote source as local tasks name it (`asr.1001@mic`): its outputs arrive from
    NATS and are published here under that name. An export (`asr.1001>kitchen`) subscribes a local
    source and sends its outputs to the board that imported it."""
    name: str
    board: str  # the other board
    source: str  # an export's local source (an import's is its name)
    info: dict[str, Any]  # what sys lists; `owner`, `ref`, `made_by` (a request_id): whom to tell when the link breaks
    used: bool = False  # an import some local task took: it is let go when the last one leaves

    @property
    def subscribe(self) -> list[str]:
        return [self.source] if self.source != self.name else []


def origin_key(board: str, client: bytes, conn: int) -> str:
    return f"{board}/{client.hex()}/{conn}"


def parse_origin(origin: str) -> tuple[str, bytes, int]:
    board, client, conn = origin.split("/")
    return board, bytes.fromhex(client), int(conn)


class FleetBridge:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.board = wire.board_name(settings["fleet.board"])
        self.urls = wire.fleet_urls(settings)
        self.alive_s = float(settings["fleet.alive_s"])
        self.liveness_s = float(settings["fleet.liveness_s"])
        self.discover_s = float(settings["fleet.discover_s"])
        self.slots = int(settings["fleet.slots"])
        self.balance_wait_s = float(settings["fleet.balance_wait_s"])
        self.heartbeat_s = float(settings["bus.heartbeat_s"])
        self.client = BusClient.for_settings(settings, "fleet")
        # Load-balanced inferences run on this board's own pool tasks (never balanced again from here).
        self.pool = TaskPool(settings, self.client, name=f"fleet-{self.board}", keep_alive=settings["http.keep_alive"],
                             max_queue=max(1, self.slots), balance=False)
        self.balanced_running = 0
        self.model_counts: dict[str, dict[str, int]] = {}  # model subject -> accepted / busy answers ($SRV.STATS)
        self._ctx = bus.Context()
        self.sock: bus.DealerSocket | None = None
        # Registered as the unit `fleet` too: one identity for the process's life and the run dir's key.
        self.identity = bus.peer_identity(FLEET_UNIT)
        self.key = settings.bus_key()
        self.nc = None
        self.service = None
        self.instance = ""  # this bridge process among all that ever ran as this board (set on joining)
        self.seen: dict[str, tuple[str, float]] = {}  # board -> (its bridge process, when it last announced itself)
        self.exported: dict[str, int] = {}  # remote origin -> the bus connection serving it here
        self.serving: dict[str, set[asyncio.Task]] = {}  # remote origin -> tasks answering its requests
        self.calls: dict[str, asyncio.Task] = {}  # a remote request's call key -> the task answering it
        self.balanced_calls: dict[tuple[bytes, str], set[asyncio.Task]] = {}  # (client, request_id) -> llm@* out
        self.forwarding: dict[tuple[bytes, int], set[asyncio.Task]] = {}  # local (client, conn) -> requests out
        self._background: set[asyncio.Task] = set()
        self._refused = asyncio.Event()
        self._refusal = ""
        self._inbox = ""  # one subscription <inbox>.* receives the answers to every request sent from here
        self._calls = itertools.count(1)
        self._replies: dict[str, Mailbox] = {}
        self.imports: dict[str, LinkEnd] = {}  # remote sources local tasks take
        self._frees: dict[str, int] = {}  # model subject -> slots announced free so far (unitbus.free.*)
        self._freed: dict[str, asyncio.Event] = {}  # model subject -> set at the next such announcement
        self.exports: dict[str, LinkEnd] = {}  # local sources other boards take

    # lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> "FleetBridge":
        import nats
        from nats.micro import add_service

        # nats-py keeps retrying a refused login; refused credentials end the join instead.
        connect = asyncio.ensure_future(nats.connect(
            servers=self.urls, name=f"unitbus-{self.board}", **self._credentials(), connect_timeout=2,
            allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.5, ping_interval=1,
            max_outstanding_pings=2, error_cb=self._nats_error, disconnected_cb=self._nats_disconnected,
            reconnected_cb=self._nats_reconnected))
        refused = asyncio.ensure_future(self._refused.wait())
        await asyncio.wait([connect, refused], return_when=asyncio.FIRST_COMPLETED)
        refused.cancel()
        if not connect.done():
            connect.cancel()
            raise PermissionError(f"the NATS server refused this board's credentials: {self._refusal}")
        self.nc = connect.result()
        self.instance = secrets.token_hex(8)
        self._inbox = self.nc.new_inbox()
        await self.nc.subscribe(self._inbox + ".*", cb=self._on_reply)
        await self.nc.subscribe(wire.alive_subject("*"), cb=self._on_alive)
        await self.nc.subscribe(wire.GONE, cb=self._on_gone)
        await self.nc.subscribe(wire.CANCEL, cb=self._on_cancel)
        await self.nc.subscribe(wire.sink_subject(self.board), cb=self._on_sink)
        await self.nc.subscribe(wire.link_subject(self.board), cb=self._on_link)
        await self.nc.subscribe(wire.UNLINK, cb=self._on_unlink)
        await self.nc.subscribe(wire.free_subject("*"), cb=self._on_free)
        self.service = await add_service(self.nc, name=wire.SERVICE, version=VERSION,
                                         description="unitbus board", metadata={"board": self.board},
                                         stats_handler=self._endpoint_stats)
        await self.service.add_endpoint(name="board", subject=wire.board_subject(self.board), handler=self._on_request,
                                        metadata={"board": self.board})
        for mode in self._served_models():
            await self.service.add_endpoint(name=f"model-{wire.model_subject(mode).rsplit('.', 1)[1]}",
                                            subject=wire.model_subject(mode), queue_group=wire.MODEL_QUEUE,
                                            handler=self._on_model, metadata={"board": self.board, "model": mode})
        await self.nc.flush()
        await self.pool.start()
        self.sock = self._ctx.dealer(self.settings.bus_endpoint(), self.identity)
        self._hello()
        for loop in (self._unit_loop(), self._heartbeat_loop(), self._alive_loop()):
            self.spawn(loop)
        log.info("board %s joined the fleet on %s", self.board, ", ".join(self.urls))
        return self

    def _credentials(self) -> dict:
        s = self.settings
        options: dict = {}
        if s["fleet.token"]:
            options["token"] = s["fleet.token"]
        if s["fleet.nkey_seed"]:
            options["nkeys_seed"] = s["fleet.nkey_seed"]
        if s["fleet.tls_ca"] or s["fleet.tls_cert"]:
            context = ssl.create_default_context(cafile=s["fleet.tls_ca"] or None)
            if s["fleet.tls_cert"]:
                context.load_cert_chain(s["fleet.tls_cert"], s["fleet.tls_key"] or None)
            options["tls"] = context
        return options

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.nc is not None:
            try:
                await self.nc.close()
            except Exception as exc:  # the server may already be gone at shutdown
                log.warning("closing the NATS connection: %s", exc)
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._ctx.term()
        await self.pool.close()

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _nats_error(self, exc: Exception) -> None:
        log.warning("NATS: %s", exc)
        if self.nc is None and "authorization" in str(exc).lower():
            self._refusal = str(exc)
            self._refused.set()

    async def _nats_disconnected(self) -> None:
        log.warning("NATS server lost; reconnecting")

    async def _nats_reconnected(self) -> None:
        log.info("NATS reconnected to %s", self.nc.connected_url.netloc if self.nc and self.nc.connected_url else "?")

    # presence ----------------------------------------------------------------------------------
    async def _alive_loop(self) -> None:
        woke = time.monotonic()
        while True:
            if self.nc is not None and self.nc.is_connected:
                await self.nc.publish(wire.alive_subject(self.board), wire.pack(i=self.instance))
            now = time.monotonic()
            if now - woke > self.alive_s + WAIT_STEP_S:
                # This process was held up (CPU starvation): announcements may be unread; judge next round.
                for board, (instance, last) in list(self.seen.items()):
                    self.seen[board] = (instance, max(last, now - self.alive_s))
            for board, (_, last) in list(self.seen.items()):
                if now - last > self.liveness_s:
                    del self.seen[board]
                    log.warning("board %s silent for %.1f s: gone from the fleet", board, now - last)
                    self._drop_origins(f"{board}/")
                    self._board_links_gone(board, f"board {board} stopped answering")
            await asyncio.sleep(self.alive_s)
            woke = time.monotonic()

    async def _on_alive(self, msg) -> None:
        board = msg.subject.rsplit(".", 1)[1]
        try:
            instance = str(wire.unpack(msg.data)["i"])
        except (wire.WireError, KeyError):
            return
        before = self.seen.get(board)
        if before is None and board != self.board:
            log.info("board %s is in the fleet", board)
        elif before is not None and before[0] != instance:
            # Its bridge restarted: the connections its former process held here have no owner any more.
            log.info("board %s rejoined", board)
            self._drop_origins(f"{board}/")
            self._board_links_gone(board, f"board {board} restarted its fleet bridge")
        now = time.monotonic()
        self.seen[board] = (instance, now)

    async def discover(self) -> list[str]:
        """Every board's bridge answers $SRV.PING.unitbus; gather the answers for fleet.discover_s."""
        assert self.nc is not None
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        boards: set[str] = set()
        try:
            await self.nc.publish(f"$SRV.PING.{wire.SERVICE}", b"", reply=inbox)
            deadline = time.monotonic() + self.discover_s
            while (left := deadline - time.monotonic()) > 0:
                try:
                    msg = await sub.next_msg(timeout=left)
                except Exception:  # nats' TimeoutError: the window is over
                    break
                try:
                    board = json.loads(msg.data)["metadata"]["board"]
                except (ValueError, KeyError, TypeError):
                    continue  # another program's service of the same name
                boards.add(board)
        finally:
            await sub.unsubscribe()
        return sorted(boards)

    # import: requests of this board to another ---------------------------------------------------
    def _hello(self) -> None:
        assert self.sock is not None
        self.sock.send(bus.Hello(role="unit", name=FLEET_UNIT, names=[FLEET_UNIT], actions=[], version=VERSION,
                                 features=["fleet", f"board:{self.board}"], key=self.key))

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            if self.sock is not None:
                self.sock.send(bus.Heartbeat())

    async def _unit_loop(self) -> None:
        assert self.sock is not None
        await self.sock.serve(self._unit_message)

    def _unit_message(self, message: bus.Message) -> None:
        assert self.sock is not None
        if isinstance(message, bus.Req) and message.route is not None:
            self._track(self.forwarding, (message.route[0], message.route[2]), self.spawn(self._forward(message)))
        elif isinstance(message, bus.Gone):
            self._local_gone(message.client, message.conn)
        elif isinstance(message, bus.Hello):
            self._hello()  # sys restarted and does not know us
            for end in [*self.imports.values(), *self.exports.values()]:
                self._announce_end(end)
        elif isinstance(message, bus.Chain):
            self._chain_out(message)
        elif isinstance(message, bus.TaskEvent) and message.op == "down":
            self._source_down(message.work_id)
        elif isinstance(message, bus.Control) and message.op == IMPORT:
            self.spawn(self._import(message.data))
        elif isinstance(message, bus.Control) and message.op == "subscribers":
            self._import_counts(message.data)
        elif isinstance(message, bus.Control) and message.op == IMPORT_DONE:
            for ref in (message.data or {}).get("sources") or []:
                if ref in self.imports and not self.imports[ref].used:
                    self._let_go(ref)  # the setup or link that wanted it failed
        elif isinstance(message, bus.Control) and message.op == "reset":
            # sys.reset answered what was in flight; the bridge itself goes on (it holds no task).
            for tasks in list(self.forwarding.values()):
                for task in tasks:
                    task.cancel()
            # Every task is gone: so are the links across boards, at both ends.
            for ref in list(self.imports):
                self._let_go(ref)
            for end in list(self.exports.values()):
                self._source_down(end.source)
            log.info("sys.reset: requests to other boards cancelled")
            self.sock.send(bus.Control("reset_done", {"restart": False}))

    @staticmethod
    def _track(table: dict, key, task: asyncio.Task) -> None:
        table.setdefault(key, set()).add(task)

        def done(_: asyncio.Task) -> None:
            tasks = table.get(key)
            if tasks is not None:
                tasks.discard(task)
                if not tasks:
                    table.pop(key, None)
        task.add_done_callback(done)

    def _local_gone(self, client: bytes, conn: int | None) -> None:
        """A connection of this board closed: stop its requests out and tell the boards that serve it."""
        for (c, n), tasks in list(self.forwarding.items()):
            if c == client and (conn is None or n == conn):
                for task in tasks:
                    task.cancel()
        body = {"origin": origin_key(self.board, client, conn)} if conn is not None else \
            {"prefix": f"{self.board}/{client.hex()}/"}
        if self.nc is not None and self.nc.is_connected:
            self.spawn(self.nc.publish(wire.GONE, wire.pack(**body)))

    def _answer(self, route: list, response: Response | None, final: bool) -> None:
        if self.sock is not None:
            self.sock.send(bus.Msg(response=response.to_dict() if response is not None else None, route=route,
                                   final=final))

    async def _forward(self, message: bus.Req) -> None:
        route = message.route
        assert route is not None
        try:
            request = Request.from_dict(message.request)
        except (KeyError, TypeError):
            self._answer(route, error_reply("0", "sys", ErrorCode.JSON_FORMAT), True)
            return
        local_id, board = split_board(request.work_id)
        origin = origin_key(self.board, route[0], route[2])
        try:
            if board == "":
                raise UnitError(ErrorCode.UNIT_CALL, f"{request.work_id}: a board name is 1-64 letters, digits, '-' "
                                                     "or '_'")
            if board is None:
                self._answer(route, await self._fleet_listing(request, origin), True)
                return
            if board == ANY_BOARD:
                if request.action == "pause":  # data: the request_id of the inference to stop
                    for task in self.balanced_calls.get((route[0], str(request.data)), set()):
                        task.cancel()
                    self._answer(route, reply(request), True)
                    return
                key = (route[0], request.request_id)
                self._track(self.balanced_calls, key, asyncio.current_task())
                async for response in self.balanced(local_id, request, origin):
                    self._answer(route, response, False)
                self._answer(route, None, True)
                return
            remote = Request(request.request_id, local_id, request.action, request.object, request.data,
                             request.token)
            final = False
            async for response, final in self.remote(board, remote, origin, message.binary):
                self._answer(route, response, final)
            if not final:
                self._answer(route, None, True)
        except UnitError as exc:
            self._answer(route, error_reply(request.request_id, request.work_id, exc), True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("forwarding %s.%s", request.work_id, request.action)
            self._answer(route, error_reply(request.request_id, request.work_id, ErrorCode.OPERATION_FAILED,
                                            f"fleet bridge: {type(exc).__name__}: {exc}"), True)

    async def _exchange(self, subject: str, body: bytes, origin: str) -> AsyncIterator[dict]:
        """One request on `subject` and the bodies answered on its inbox until the final one.

        The board taking it says so at once ({"accepted": board}) and then sends an answer or a tick at
        least every fleet.alive_s while the request is open. Raises NoResponders when nobody subscribes
        `subject`, BoardGone when nothing came for fleet.liveness_s (nobody took the request, or its taker
        vanished, or this board lost NATS), UnitError when answers were lost (a gap in their numbers).
        A caller that stops early cancels the request on the taker.
        """
        if self.nc is None or not self.nc.is_connected:
            raise BoardGone("this board has lost its NATS server; reconnecting")
        inbox = f"{self._inbox}.{next(self._calls)}"
        answers: Mailbox = Mailbox()
        self._replies[inbox] = answers
        last = time.monotonic()
        quiet_steps = 0  # waits in a row that timed out: a stall of this process counts as one, not as silence
        taker = None
        expected = 0  # the number of the next answer
        finished = False
        try:
            await self.nc.publish(subject, body, reply=inbox, headers={wire.ORIGIN_HEADER: origin,
                                                                        wire.CALL_HEADER: inbox})
            while True:
                msg = await answers.next(WAIT_STEP_S)
                if msg is None:  # nothing yet; is the taker still there?
                    quiet_steps += 1
                    if time.monotonic() - last > self.liveness_s and quiet_steps * WAIT_STEP_S >= self.liveness_s:
                        # (a cancel still goes out: it may come back)
                        who = f"board {taker}" if taker else f"the board taking {subject}"
                        raise BoardGone(f"{who} stopped answering (silent for {self.liveness_s:g} s)") from None
                    continue
                if msg.headers and msg.headers.get("Status") == "503":
                    finished = True
                    raise NoResponders(subject)
                last, quiet_steps = time.monotonic(), 0
                try:
                    reply_body = wire.unpack(msg.data)
                except wire.WireError as exc:
                    raise UnitError(ErrorCode.UNIT_CALL, f"{subject}: a bad answer: {exc}") from None
                if "accepted" in reply_body:
                    taker = str(reply_body["accepted"])
                if reply_body.get("n", expected) != expected:
                    raise UnitError(ErrorCode.UNIT_CALL, f"answers of board {taker} were lost in transit "
                                                         "(a NATS server failed over); retry")
                expected += 1
                finished = bool(reply_body.get("final"))
                if not finished or "response" in reply_body:
                    yield reply_body
                if finished:
                    return
        finally:
            self._replies.pop(inbox, None)
            if not finished and self.nc.is_connected:
                try:
                    await self.nc.publish(wire.CANCEL, wire.pack(call=inbox))
                except Exception as exc:  # the connection closed meanwhile
                    log.debug("cancel of %s not sent: %s", inbox, exc)

    async def _on_reply(self, msg) -> None:
        answers = self._replies.get(msg.subject)
        if answers is not None:  # else an answer to a request given up
            answers.put(msg)

    async def remote(self, board: str, request: Request, origin: str,
                     binary: bytes | None = None) -> AsyncIterator[tuple[Response, bool]]:
        """The answers of `board` to `request`, each with whether it is the last (the last one carries
        `final` itself, so sys and the client get one message fewer); UnitError when the board is not there."""
        body = wire.pack(request=request.to_dict(), binary=binary)
        try:
            async for reply_body in self._exchange(wire.board_subject(board), body, origin):
                if "response" not in reply_body:
                    continue
                try:
                    yield Response.from_dict(reply_body["response"]), bool(reply_body.get("final"))
                except (KeyError, TypeError, ValueError) as exc:
                    raise UnitError(ErrorCode.UNIT_CALL, f"board {board} sent a bad answer: {exc}") from None
        except NoResponders:
            raise UnitError(ErrorCode.UNIT_CALL, f"no board named {board} in the fleet (no responders)") from None
        except BoardGone as exc:
            raise UnitError(ErrorCode.UNIT_CALL, str(exc)) from None

    async def balanced(self, unit: str, request: Request, origin: str) -> AsyncIterator[Response]:
        """`<unit>@*` inference: to one board that serves data.model and is not busy. A board that answers
        "busy", or disappears before its first output, hands the request to another."""
        data = request.data
        if unit != "llm" or request.action != "inference" or not isinstance(data, dict) \
                or not isinstance(data.get("model"), str) or "input" not in data:
            raise UnitError(ErrorCode.JSON_FORMAT, f"{request.work_id} takes inference with data "
                                                   '{"model": ..., "input": ..., "setup": {...}}, and pause')
        body = wire.pack(request_id=request.request_id, object=request.object, model=data["model"],
                         input=data["input"], setup=data.get("setup") if isinstance(data.get("setup"), dict) else {})
        deadline = time.monotonic() + self.balance_wait_s
        work_id = request.work_id
        subject = wire.model_subject(data["model"])
        while True:
            busy = yielded = False
            frees = self._frees.get(subject, 0)
            try:
                async for reply_body in self._exchange(subject, body, origin):
                    if reply_body.get("busy"):
                        busy = True
                    elif "response" in reply_body:
                        response = Response.from_dict(reply_body["response"])
                        work_id = response.work_id
                        yielded = True
                        yield response
                if not busy:
                    return
            except NoResponders:
                raise UnitError(ErrorCode.MODEL_LOADING, f"no board in the fleet serves {data['model']}") from None
            except BoardGone as exc:
                if yielded:
                    raise UnitError(ErrorCode.UNIT_CALL, message=f"{work_id}: {exc}") from None
                log.warning("%s: %s before its first output; handing it to another board", request.request_id, exc)
            except (KeyError, TypeError, ValueError) as exc:
                raise UnitError(ErrorCode.UNIT_CALL, f"a bad answer to {request.request_id}: {exc}") from None
            if time.monotonic() > deadline:
                raise UnitError(ErrorCode.QUEUE_FULL, f"every board serving {data['model']} stayed busy for "
                                                      f"{self.balance_wait_s:g} s")
            if self._frees.get(subject, 0) == frees:  # no slot came free meanwhile: wait for one (or a while)
                freed = self._freed.setdefault(subject, asyncio.Event())
                try:
                    await asyncio.wait_for(freed.wait(), BUSY_RETRY_S)
                except asyncio.TimeoutError:
                    pass

    async def _on_free(self, msg) -> None:
        """A board finished a load-balanced inference: requests waiting for that model are offered again."""
        subject = wire.model_subject_of_free(msg.subject)
        self._frees[subject] = self._frees.get(subject, 0) + 1
        freed = self._freed.pop(subject, None)
        if freed is not None:
            freed.set()

    async def _fleet_listing(self, request: Request, origin: str) -> Response:
        """sys.lstask / lsmode / hwinfo of every board: {board: data}; lstask's work_ids name their board."""
        data = {k: v for k, v in request.data.items() if k != "fleet"} if isinstance(request.data, dict) else NONE
        inner = Request(request.request_id, "sys", request.action, request.object, data or NONE)

        async def one(board: str):
            try:
                async for response, _ in self.remote(board, inner, origin):
                    if response.code != 0:
                        return {"error": {"code": response.code, "message": response.message}}
                    if request.action == "lstask" and isinstance(response.data, list):
                        return [{**t, "work_id": on_board(t.get("work_id", ""), board)} if isinstance(t, dict) else t
                                for t in response.data]
                    return response.data
                return {"error": {"code": int(ErrorCode.UNIT_CALL), "message": "no answer"}}
            except UnitError as exc:
                return {"error": {"code": int(exc.code), "message": exc.message}}

        boards = await self.discover()
        results = await asyncio.gather(*(one(b) for b in boards))
        return reply(request, "sys", data=dict(zip(boards, results)), object=f"sys.{request.action}")

    # export: requests of other boards to this one ------------------------------------------------
    def _served_models(self) -> list[str]:
        from core.manifest import ManifestStore

        return sorted(m.mode for m in ManifestStore(self.settings.as_dict()).all() if m.type == "llm")

    def _start_serving(self, req, coro_of) -> None:
        headers = req.headers or {}
        origin, call = headers.get(wire.ORIGIN_HEADER, ""), headers.get(wire.CALL_HEADER, "")
        task = self.spawn(coro_of(req, origin))
        self._track(self.serving, origin, task)
        if call:
            self.calls[call] = task
            task.add_done_callback(lambda _: self.calls.pop(call, None))

    async def _on_request(self, req) -> None:
        # The endpoint's handler runs one message at a time: answer each in its own task.
        self._start_serving(req, self._serve)

    def _endpoint_stats(self, stats) -> dict:
        counts = self.model_counts.get(stats.subject, {"accepted": 0, "busy": 0})  # none asked yet: both 0
        return {"running": self.balanced_running, "slots": self.slots, **counts}

    async def _on_model(self, req) -> None:
        counts = self.model_counts.setdefault(req.subject, {"accepted": 0, "busy": 0})
        if self.balanced_running >= self.slots:
            counts["busy"] += 1
            replier = Replier(req, self.board, self.instance)
            await replier.send(busy=True)
            await replier.send(final=True)
            return
        self.balanced_running += 1  # counted here: the next message of the queue already sees it
        counts["accepted"] += 1
        self._start_serving(req, self._serve_model)

    async def _serve_model(self, req, origin: str) -> None:
        """A load-balanced inference: this board's pool task of the model (loaded on first use) runs it."""
        replier = Replier(req, self.board, self.instance)
        replier.keep_alive(self.alive_s)
        ran = False
        try:
            await replier.send()  # taken at once: a model load may take long, and so may the first token
            try:
                body = wire.unpack(req.data)
                request_id, object, model = str(body["request_id"]), str(body["object"]), str(body["model"])
                data, setup = body["input"], body.get("setup") or {}
            except (wire.WireError, KeyError, TypeError) as exc:
                failure = error_reply("0", "llm@*", ErrorCode.JSON_FORMAT, str(exc))
                await replier.send(response=failure.to_dict())
                await replier.send(final=True)
                return
            try:
                try:
                    served = await self.pool.acquire(await self.pool.find(model), setup=setup or None)
                except UnitError as exc:
                    if exc.code not in NOT_HERE:
                        raise
                    # This board cannot run it now (its llm unit is not running, or every task is taken):
                    # "busy" hands the request on to another board.
                    log.info("%s: not here (%s); handed on", request_id, exc.message)
                    counts = self.model_counts[req.subject]
                    counts["accepted"], counts["busy"] = counts["accepted"] - 1, counts["busy"] + 1
                    await replier.send(busy=True)
                    await replier.send(final=True)
                    return
                work_id = on_board(served.work_id, self.board)
                ran = True
                async for response in self.pool.stream(served, data, request_id, object, whole=True):
                    response.work_id = work_id
                    await replier.send(response=response.to_dict())
            except UnitError as exc:
                await replier.send(response=error_reply(request_id, f"llm@{self.board}", exc).to_dict())
            await replier.send(final=True)
        finally:
            replier.stop()
            self.balanced_running -= 1
            if ran and self.nc is not None and self.nc.is_connected:  # a slot here is free again: say so
                self.spawn(self.nc.publish(wire.free_subject(req.subject), b""))

    async def _on_cancel(self, msg) -> None:
        try:
            call = wire.unpack(msg.data).get("call")
        except wire.WireError as exc:
            log.warning("%s", exc)
            return
        task = self.calls.pop(call, None) if isinstance(call, str) else None
        if task is not None:
            task.cancel()

    async def _serve(self, req, origin: str) -> None:
        try:
            body = wire.unpack(req.data)
            if "export" in body:
                await self._serve_export(req, origin, body)
                return
            # The same checks as for a request from a TCP client: another board's bridge is no more trusted.
            request = request_of(body["request"])
            parse_origin(origin)
        except (wire.WireError, KeyError, TypeError, ValueError, EnvelopeError) as exc:
            failure = error_reply(exc.request_id, "sys", exc) if isinstance(exc, EnvelopeError) else \
                error_reply("0", "sys", ErrorCode.JSON_FORMAT, str(exc))
            replier = Replier(req, self.board, self.instance)
            await replier.send(response=failure.to_dict())
            await replier.send(final=True)
            return
        conn = self._conn_for(origin)
        replier = Replier(req, self.board, self.instance)
        replier.keep_alive(self.alive_s)
        try:
            async for response, final in self.client.answers(request, conn, binary=body.get("binary")):
                if response is None:
                    await replier.send(final=True)
                    continue
                response.work_id = on_board(response.work_id, self.board)
                # The last answer carries `final` itself: one NATS message fewer per request.
                await replier.send(response=response.to_dict(), **({"final": True} if final else {}))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("serving %s.%s for %s", request.work_id, request.action, origin)
            failure = error_reply(request.request_id, on_board(request.work_id, self.board),
                                  ErrorCode.OPERATION_FAILED, f"fleet bridge of {self.board}: {exc}")
            if self.nc is not None and self.nc.is_connected:
                await replier.send(response=failure.to_dict())
                await replier.send(final=True)
        finally:
            replier.stop()

    def _conn_for(self, origin: str) -> int:
        conn = self.exported.get(origin)
        if conn is None:
            conn = self.client.open_conn(lambda response, final: self._sink(origin, response))
            self.exported[origin] = conn
        return conn

    def _sink(self, origin: str, response: Response) -> None:
        """An output of a task here that the remote connection receives (enoutput of a linked task)."""
        if self.nc is None or not self.nc.is_connected:
            return
        response.work_id = on_board(response.work_id, self.board)
        board = origin.split("/", 1)[0]
        self.spawn(self.nc.publish(wire.sink_subject(board), wire.pack(origin=origin, response=response.to_dict())))

    async def _on_sink(self, msg) -> None:
        try:
            body = wire.unpack(msg.data)
            _, client, conn = parse_origin(body["origin"])
            response = body["response"]
        except (wire.WireError, KeyError, TypeError, ValueError) as exc:
            log.warning("bad output from the fleet dropped: %s", exc)
            return
        if self.sock is not None:
            self.sock.send(bus.Msg(response=response, owner=[client, conn]))

    async def _on_gone(self, msg) -> None:
        try:
            body = wire.unpack(msg.data)
        except wire.WireError as exc:
            log.warning("%s", exc)
            return
        if isinstance(body.get("origin"), str):
            self._drop_origins(body["origin"], exact=True)
        elif isinstance(body.get("prefix"), str) and body["prefix"]:
            self._drop_origins(body["prefix"])

    def _drop_origins(self, key: str, exact: bool = False) -> None:
        """Remote connections that went away: stop what they asked for and close their bus connections."""
        for origin in [o for o in set(self.exported) | set(self.serving)
                       if (o == key if exact else o.startswith(key))]:
            for task in self.serving.pop(origin, set()):
                task.cancel()
            conn = self.exported.pop(origin, None)
            if conn is not None:
                self.client.close_conn(conn)

    # links across boards (protocol.md §21.8) -----------------------------------------------------
    def _announce_end(self, end: LinkEnd) -> None:
        if self.sock is not None:
            self.sock.send(bus.TaskEvent(op="up", work_id=end.name, info=end.info, subscribe=end.subscribe))

    def _end_down(self, end: LinkEnd, why: str | None) -> None:
        """The end is gone; `why` a fault, which sys tells the connection that made the link."""
        if self.sock is not None:
            self.sock.send(bus.TaskEvent(op="down", work_id=end.name, info={"ended": why} if why else {}))
        log.info("link end %s (board %s) gone%s", end.name, end.board, f": {why}" if why else "")

    def _origin_of(self, client: bytes, conn: int) -> str:
        """The origin of a request sys passed on: a remote connection's when it came through this bridge."""
        if client == self.client.identity:
            for origin, local in self.exported.items():
                if local == conn:
                    return origin
        return origin_key(self.board, client, conn)

    def _link_info(self, origin: str, ref: str, request_id: str, **info: Any) -> dict[str, Any]:
        board, client, conn = parse_origin(origin)
        owner = {"owner": [client, conn]} if board == self.board else {}  # a connection of this board
        return {"ref": ref, "made_by": request_id, **owner, **info}

    async def _import(self, data: Any) -> None:
        """sys holds a setup or link that names remote sources: bring each here, then let it go on."""
        key = data.get("key") if isinstance(data, dict) else None
        error = None
        try:
            origin = self._origin_of(bytes(data["client"]), int(data["conn"]))
            for ref in data["sources"]:
                if str(ref) not in self.imports:
                    await self._import_one(str(ref), origin, str(data.get("made_by", "0")))
        except UnitError as exc:
            error = exc.message
        except (KeyError, TypeError, ValueError) as exc:
            error = f"a bad import request: {exc}"
        if self.sock is not None:
            self.sock.send(bus.Control(IMPORTED, {"key": key, "error": error}))

    async def _import_one(self, ref: str, origin: str, request_id: str) -> None:
        local, board = split_board(ref)
        assert board is not None
        answer = None
        body = wire.pack(export=local, to=self.board, request_id=request_id)
        try:
            async for reply_body in self._exchange(wire.board_subject(board), body, origin):
                if "response" in reply_body:
                    answer = Response.from_dict(reply_body["response"])
        except NoResponders:
            raise UnitError(ErrorCode.LINK_FALSE, f"{ref}: no board named {board} in the fleet") from None
        except BoardGone as exc:
            raise UnitError(ErrorCode.LINK_FALSE, f"{ref}: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise UnitError(ErrorCode.LINK_FALSE, f"{ref}: a bad answer from board {board}: {exc}") from None
        if answer is None or answer.code != 0:
            raise UnitError(ErrorCode.LINK_FALSE, f"{ref}: {answer.message if answer else 'no answer'}")
        produced = answer.data.get("response_format", "") if isinstance(answer.data, dict) else ""
        end = LinkEnd(ref, board, ref, self._link_info(origin, ref, request_id, inputs=[], response_format=produced))
        self.imports[ref] = end
        self._announce_end(end)
        log.info("%s imported from board %s", ref, board)

    async def _serve_export(self, req, origin: str, body: dict) -> None:
        """Another board takes a source of this board: subscribe it here, for that board."""
        replier = Replier(req, self.board, self.instance)
        source, target, request_id = body.get("export"), body.get("to"), str(body.get("request_id", "0"))
        try:
            if not isinstance(source, str) or not (is_task_id(source) or source == PCM_SOURCE):
                raise UnitError(ErrorCode.UNSUPPORTED_LINK, f"{source!r} is not a task or {PCM_SOURCE}")
            if not isinstance(target, str) or not BOARD_NAME.fullmatch(target):
                raise UnitError(ErrorCode.JSON_FORMAT, f"{target!r} is not a board name")
            parse_origin(origin)
            produced = PCM_SOURCE
            if source != PCM_SOURCE:
                info = await self.client.request(Request(request_id, source, "taskinfo"))
                if info is None or info.code != 0:
                    raise UnitError(ErrorCode.LINK_FALSE, f"no task {source} on board {self.board}")
                produced = info.data.get("response_format", "") if isinstance(info.data, dict) else ""
            name = f"{source}>{target}"
            if name not in self.exports:
                end = LinkEnd(name, target, source, self._link_info(origin, on_board(source, self.board), request_id,
                                                                    inputs=[source]))
                self.exports[name] = end
                self._announce_end(end)
                log.info("%s linked to board %s", source, target)
            answer = Response(request_id, on_board(source, self.board), data={"response_format": produced})
        except UnitError as exc:
            answer = error_reply(request_id, on_board(str(source), self.board), exc)
        except ValueError as exc:  # the origin
            answer = error_reply(request_id, "sys", ErrorCode.JSON_FORMAT, str(exc))
        await replier.send(response=answer.to_dict())
        await replier.send(final=True)

    def _chain_out(self, message: bus.Chain) -> None:
        """An output of a local source: to each board that imported it. PCM is the NATS payload itself."""
        if self.nc is None or not self.nc.is_connected:
            return
        source = on_board(message.src, self.board)
        headers = {wire.SOURCE_HEADER: source}
        if message.response is not None:
            try:
                headers[wire.RESPONSE_HEADER] = json.dumps({**message.response, "work_id": source}, ensure_ascii=True,
                                                           separators=(",", ":"))
            except (TypeError, ValueError) as exc:
                log.warning("an output of %s not sent across: %s", message.src, exc)
                return
        for name in message.dst:
            end = self.exports.get(name)
            if end is not None:
                self.spawn(self.nc.publish(wire.link_subject(end.board), message.binary or b"", headers=headers))

    async def _on_link(self, msg) -> None:
        headers = msg.headers or {}
        source = headers.get(wire.SOURCE_HEADER, "")
        if source not in self.imports:
            return  # let go meanwhile (or never asked for): no local task takes it
        response = None
        if wire.RESPONSE_HEADER in headers:
            try:
                response = json.loads(headers[wire.RESPONSE_HEADER])
            except ValueError:
                log.warning("a bad output of %s dropped", source)
                return
            if not isinstance(response, dict):
                return
        if self.sock is not None:
            self.sock.send(bus.Msg(response=response, publish=source, binary=msg.data or None))

    def _import_counts(self, counts: Any) -> None:
        """sys's count of local tasks taking each import: one that had takers and has none is let go."""
        if not isinstance(counts, dict):
            return
        for ref, end in list(self.imports.items()):
            if counts.get(ref, 0) > 0:
                end.used = True
            elif end.used:
                self._let_go(ref)

    def _let_go(self, ref: str) -> None:
        """No local task takes `ref` any more: its board stops sending it."""
        end = self.imports.get(ref)
        if end is None:
            return
        self._release_import(ref, None)
        if self.nc is not None and self.nc.is_connected:
            local = split_board(ref)[0]
            self.spawn(self.nc.publish(wire.UNLINK, wire.pack(board=end.board, export=f"{local}>{self.board}")))

    def _release_import(self, ref: str, why: str | None) -> None:
        end = self.imports.pop(ref, None)
        if end is not None:
            self._end_down(end, why)

    def _drop_export(self, name: str, why: str | None) -> None:
        end = self.exports.pop(name, None)
        if end is not None:
            self._end_down(end, why)

    async def _on_unlink(self, msg) -> None:
        try:
            body = wire.unpack(msg.data)
        except wire.WireError as exc:
            log.warning("%s", exc)
            return
        if body.get("board") != self.board:
            return
        if isinstance(body.get("export"), str):  # the importer let go
            self._drop_export(body["export"], None)
        if isinstance(body.get("import"), str):  # the source on its board went away: as a local one, silently
            self._release_import(body["import"], None)

    def _source_down(self, work_id: str) -> None:
        for name, end in list(self.exports.items()):
            if end.source == work_id:
                self._drop_export(name, None)
                if self.nc is not None and self.nc.is_connected:
                    self.spawn(self.nc.publish(wire.UNLINK, wire.pack(board=end.board,
                                                                      **{"import": on_board(work_id, self.board)})))

    def _board_links_gone(self, board: str, why: str) -> None:
        """Links to a board that vanished end, and whoever made them here is told."""
        for ref in [r for r, e in self.imports.items() if e.board == board]:
            self._release_import(ref, why)
        for name in [n for n, e in self.exports.items() if e.board == board]:
            self._drop_export(name, why)
