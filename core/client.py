"""BusClient: how bridges, gateways, the CLI and tests talk to sys.

One DEALER socket per client process. Every request gets a tag; replies and outputs come back tagged
with it. Connections (`conn`) stand for the client's own users (one per TCP connection, one for the
UART): a connection's sink receives its chain outputs and anything not awaited through request()/stream().
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from typing import Any, AsyncIterator, Callable, Generic, TypeVar

from core import bus
from core.envelope import Request, Response, error_reply
from core.errors import ErrorCode, UnitError
from core.settings import Settings

log = logging.getLogger(__name__)

Sink = Callable[[Response, bool], None]  # (response, final)
ControlHandler = Callable[[bus.Control], None]
T = TypeVar("T")


class Mailbox(Generic[T]):
    """A queue with one reader that a callback fills. Waiting is a future and a timer: asyncio.wait_for
    on a queue's get() would make a task for every item, on the request/reply paths."""

    def __init__(self) -> None:
        self._items: collections.deque[T] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: T) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self, timeout: float | None = None) -> T | None:
        """The next item, or None when none came within `timeout` seconds."""
        if not self._items:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = None if timeout is None else loop.call_later(timeout, _wake, waiter)
            try:
                await waiter
            finally:
                if timer is not None:
                    timer.cancel()
                self._waiter = None
        return self._items.popleft() if self._items else None


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


Waiter = Mailbox[tuple[Response | None, bool]]  # (response, final) for one stream()


class BusClient:
    def __init__(self, endpoint: str, name: str = "client", features: tuple[str, ...] = (),
                 heartbeat_s: float = bus.HEARTBEAT_S, liveness_s: float = bus.LIVENESS_S, key: str = ""):
        self.endpoint = endpoint
        self.key = key
        self.name = name
        self.features = list(features)
        self.heartbeat_s = heartbeat_s
        self.liveness_s = liveness_s
        self._ctx = bus.Context()
        self.identity = bus.peer_identity(name)
        self._sock: bus.DealerSocket | None = None
        self._tags = itertools.count(1)
        self._conns = itertools.count(1)
        self._waiters: dict[int, Waiter] = {}
        self._pending: dict[int, tuple[int, Request]] = {}  # tag -> (conn, request) until final
        self._sinks: dict[int, Sink] = {}
        self._conns_open: set[int] = set()
        self.on_control: ControlHandler | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._last_seen = time.monotonic()

    @classmethod
    def for_settings(cls, settings: Settings, name: str, features: tuple[str, ...] = ()) -> "BusClient":
        """A client of the stack these settings describe: its endpoint, registration key and heartbeats."""
        return cls(settings.bus_endpoint(), name=name, features=features, key=settings.bus_key(),
                   heartbeat_s=float(settings["bus.heartbeat_s"]), liveness_s=float(settings["bus.liveness_s"]))

    async def start(self) -> "BusClient":
        self._connect()
        self._tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._heartbeat())]
        return self

    def _connect(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = self._ctx.dealer(self.endpoint, self.identity)
        self._hello()
        self._last_seen = time.monotonic()

    def _hello(self) -> None:
        assert self._sock is not None
        self._sock.send(bus.Hello(role="client", name=self.name, features=self.features,
                                  conns=sorted(self._conns_open), key=self.key))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sock is not None:
            # Goodbye: sys then keeps this process's tasks (unowned) instead of releasing them as a crash's.
            self._sock.send(bus.Gone(conn=None))
            self._sock.close(linger_s=bus.GOODBYE_LINGER_S)
            self._sock = None
        self._ctx.term()

    async def __aenter__(self) -> "BusClient":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # connections -------------------------------------------------------------------------------
    def open_conn(self, sink: Sink | None = None) -> int:
        conn = next(self._conns)
        self._conns_open.add(conn)
        if sink is not None:
            self._sinks[conn] = sink
        return conn

    def close_conn(self, conn: int) -> None:
        """Tell sys the connection is gone: its inferences stop and its tasks lose their owner."""
        self._sinks.pop(conn, None)
        self._conns_open.discard(conn)
        for tag, (c, _) in list(self._pending.items()):
            if c == conn:
                self._pending.pop(tag, None)
                self._waiters.pop(tag, None)
        if self._sock is not None:
            self._sock.send(bus.Gone(conn=conn))

    # requests ----------------------------------------------------------------------------------
    def submit(self, request: Request, conn: int = 0, binary: bytes | None = None) -> int:
        """Send without waiting; everything it produces goes to the connection's sink."""
        tag = next(self._tags)
        self._pending[tag] = (conn, request)
        assert self._sock is not None, "BusClient.start() first"
        self._sock.send(bus.Req(tag=tag, conn=conn, request=request.to_dict(), binary=binary))
        return tag

    def in_flight(self, tag: int) -> bool:
        """Whether the request `submit` returned this tag for has not ended yet."""
        return tag in self._pending

    async def stream(self, request: Request, conn: int = 0, binary: bytes | None = None,
                     timeout: float | None = None) -> AsyncIterator[Response]:
        """Every message the request produces, until the final one."""
        async for response, _ in self.answers(request, conn, binary, timeout):
            if response is not None:
                yield response

    async def answers(self, request: Request, conn: int = 0, binary: bytes | None = None,
                      timeout: float | None = None) -> AsyncIterator[tuple[Response | None, bool]]:
        """stream(), each message with whether it is the last (which a bare final carries as None)."""
        mailbox: Waiter = Mailbox()
        tag = next(self._tags)
        self._waiters[tag] = mailbox
        self._pending[tag] = (conn, request)
        try:
            assert self._sock is not None, "BusClient.start() first"
            self._sock.send(bus.Req(tag=tag, conn=conn, request=request.to_dict(), binary=binary))
            while True:
                item = await mailbox.next(timeout)
                if item is None:
                    raise asyncio.TimeoutError()
                response, final = item
                if response is not None or final:
                    yield response, final
                if final:
                    return
        finally:
            self._waiters.pop(tag, None)
            self._pending.pop(tag, None)

    async def request(self, request: Request, conn: int = 0, binary: bytes | None = None,
                      timeout: float | None = 30.0) -> Response | None:
        """The first message of a request (a control reply); None when it ended without one."""
        async for response in self.stream(request, conn, binary, timeout):
            return response
        return None

    async def call(self, work_id: str, action: str, data: Any = None, object: str = "None", request_id: str = "0",
                   conn: int = 0, timeout: float | None = 30.0) -> Response:
        """request() for code: raises UnitError when the answer is an error."""
        request = Request(request_id, work_id, action, object, "None" if data is None else data)
        response = await self.request(request, conn, timeout=timeout)
        if response is None:
            raise UnitError(ErrorCode.UNIT_CALL, f"{work_id}.{action} ended without a reply")
        if response.code != 0:
            raise UnitError(ErrorCode(response.code) if response.code in ErrorCode._value2member_map_
                            else ErrorCode.UNIT_CALL, message=response.message)
        return response

    # receiving ---------------------------------------------------------------------------------
    async def _receive(self) -> None:
        while True:
            assert self._sock is not None
            try:
                await self._sock.serve(self._message)
            except bus.SocketClosed:  # _connect() replaced the socket: receive on the new one
                continue

    def _message(self, message: bus.Message) -> None:
        self._last_seen = time.monotonic()
        if isinstance(message, bus.Msg):
            self._deliver(message)
        elif isinstance(message, bus.Control) and message.op == "refused":
            log.error("sys refused this client: %s", message.data)
            self._fail_pending(f"sys refused this process: {message.data}")
        elif isinstance(message, bus.Control):
            if self.on_control is not None:
                self.on_control(message)
        elif isinstance(message, bus.Hello):
            # sys does not know us: it restarted (or forgot us), and what it was carrying for us is lost.
            self._fail_pending("sys restarted; the request was lost, send it again")
            self._hello()

    def _deliver(self, message: bus.Msg) -> None:
        if message.tag is not None and message.tag not in self._pending and message.tag not in self._waiters:
            return  # its request is over (answered, or failed when sys went away): a late message
        response = Response.from_dict(message.response) if message.response is not None else None
        if message.tag is not None and message.final:
            self._pending.pop(message.tag, None)
        waiter = self._waiters.get(message.tag) if message.tag is not None else None
        if waiter is not None:
            waiter.put((response, message.final))
            return
        sink = self._sinks.get(message.conn) if message.conn is not None else None
        if sink is not None and response is not None:
            sink(response, message.final)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            assert self._sock is not None
            self._sock.send(bus.Heartbeat())
            if time.monotonic() - self._last_seen > self.liveness_s:
                log.warning("sys silent for %.1f s: failing pending requests and reconnecting", self.liveness_s)
                self._fail_pending("sys is not answering")
                self._connect()

    def _fail_pending(self, why: str) -> None:
        for tag, (conn, request) in list(self._pending.items()):
            work_id = request.work_id if request.action != "setup" else request.work_id.split(".")[0]
            failure = error_reply(request.request_id, work_id, ErrorCode.UNIT_CALL, why)
            self._deliver(bus.Msg(response=failure.to_dict(), final=True, tag=tag, conn=conn))
        self._pending.clear()
