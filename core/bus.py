"""The bus wire: the only module that imports zmq.

Every process talks to the sys broker: a ROUTER socket that sys binds; units and clients connect DEALER
sockets to it (the Majordomo shape). A message is one msgpack frame, plus one raw frame when it carries
binary data (PCM) so audio is never base64-encoded inside the bus.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field, fields
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, NamedTuple, cast

import msgpack
import zmq

log = logging.getLogger(__name__)

# Heartbeat constants live together (zguide mdbroker): defaults of bus.heartbeat_s / bus.liveness_s.
HEARTBEAT_S = 1.0
LIVENESS_S = 5.0
# How long a peer that vanished (ipc disconnect) may take to answer a liveness probe.
PROBE_GRACE_S = 0.3
# How long a closing process may wait for its goodbye (Gone) to reach sys.
GOODBYE_LINGER_S = 0.5
# How many messages a socket's reader callback hands over before letting the loop run other work.
DRAIN_BATCH = 64
# Plain ints: pyzmq's enum members cost an enum operation each time they are combined.
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)



class Route(NamedTuple):
    """Who asked: a request's client, its tag for that request, and the client's connection.

    On the wire it is a msgpack array; the messages that carry one turn it back into this record."""
    client: bytes
    tag: int
    conn: int

    @property
    def owner(self) -> "Owner":
        return Owner(self.client, self.conn)


class Owner(NamedTuple):
    """A task's owner: the client connection its chain outputs and errors go to."""
    client: bytes
    conn: int


class Message:
    """Base of the typed bus messages; each subclass names its wire type in `kind`."""
    kind: ClassVar[str] = ""
    registry: ClassVar[dict[str, type["Message"]]] = {}
    binary: bytes | None
    # Every subclass is a dataclass; this tells the type checker so.
    __dataclass_fields__: ClassVar[dict[str, Any]]

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        Message.registry[cls.kind] = cls

    def encode(self) -> list[bytes]:
        body = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "binary"}
        body["t"] = self.kind
        # surrogatepass: a client's "\ud800" is a valid JSON string; the bus carries it as it is and only
        # the envelope codec replaces it with U+FFFD on the way out.
        frames = [msgpack.packb(body, use_bin_type=True, unicode_errors="surrogatepass")]
        binary = getattr(self, "binary", None)
        if binary is not None:
            frames.append(binary)
        return frames

    @staticmethod
    def decode(frames: list[bytes]) -> "Message":
        try:
            body = msgpack.unpackb(frames[0], raw=False, unicode_errors="surrogatepass")
            cls = Message.registry[body.pop("t")]
            if len(frames) > 1:
                body["binary"] = frames[1]
            return cls(**body)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError, msgpack.UnpackException) as exc:
            raise BadMessage(f"{type(exc).__name__}: {exc}") from None


class BadMessage(ValueError):
    """Frames that are not a bus message (a peer's bug or a foreign sender): dropped by the receiver."""


class SocketClosed(Exception):
    """The socket was closed, by a reconnect that replaced it, while a receiver waited on it."""


@dataclass
class Hello(Message):
    """A peer announces itself. Units list the names they serve and their actions."""
    kind: ClassVar[str] = "hello"
    role: str  # "unit" or "client"
    name: str
    names: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    version: str = ""
    features: list[str] = field(default_factory=list)
    pid: int = field(default_factory=os.getpid)
    conns: list[int] = field(default_factory=list)  # a client's open connections (a restarted sys learns them)
    key: str = ""  # the run dir's registration key (core/rundir.py); sys refuses a hello without it
    # Sources a unit publishes with no task behind them (the audio unit's sys.pcm): "" when it offers
    # the source now, else why not. sys counts each one's subscribers for its publisher.
    sources: dict[str, str] = field(default_factory=dict)
    binary: bytes | None = None


@dataclass
class Heartbeat(Message):
    kind: ClassVar[str] = "hb"
    binary: bytes | None = None


@dataclass
class Req(Message):
    """A client request. sys adds `route` (who asked), `assigned` (setup's new work_id) and `ctx`."""
    kind: ClassVar[str] = "req"
    tag: int
    conn: int
    request: dict[str, Any]
    route: Route | None = None
    assigned: str | None = None
    ctx: dict[str, Any] | None = None
    binary: bytes | None = None

    def __post_init__(self) -> None:
        if self.route is not None and not isinstance(self.route, Route):
            self.route = Route(*self.route)  # a malformed route is a TypeError: BadMessage on decode


@dataclass
class Msg(Message):
    """A reply or output.

    unit -> sys: `route` for a request's answer, or `owner` for a chain output; `publish` names the
    work_id under which linked tasks receive it; `final` ends the request (a final Msg may carry no
    response, when a request ends silently, e.g. an inference with enoutput off).
    sys -> client: `tag` and `conn` say which request and connection it belongs to.
    """
    kind: ClassVar[str] = "msg"
    response: dict[str, Any] | None = None
    route: Route | None = None
    owner: Owner | None = None
    publish: str | None = None
    final: bool = False
    tag: int | None = None
    conn: int | None = None
    binary: bytes | None = None

    def __post_init__(self) -> None:
        # Decoded from the wire they are lists; a unit's own outputs already carry the records.
        if self.route is not None and not isinstance(self.route, Route):
            self.route = Route(*self.route)
        if self.owner is not None and not isinstance(self.owner, Owner):
            self.owner = Owner(*self.owner)


@dataclass
class Chain(Message):
    """sys -> unit: an output of `src` delivered to the linked downstream tasks `dst`."""
    kind: ClassVar[str] = "chain"
    src: str
    dst: list[str]
    response: dict[str, Any] | None = None
    binary: bytes | None = None


@dataclass
class TaskEvent(Message):
    """unit -> sys: a task came up (or changed) or went down; sys -> units: a task went down."""
    kind: ClassVar[str] = "task"
    op: str  # "up" or "down"
    work_id: str
    info: dict[str, Any] = field(default_factory=dict)
    subscribe: list[str] = field(default_factory=list)
    binary: bytes | None = None


@dataclass
class Gone(Message):
    """A client connection (or, with conn None, a whole client) went away.

    client -> sys with conn None: the process says goodbye (its tasks stay, unowned). sys -> units:
    `release` when the process vanished without one (crashed): its tasks go too."""
    kind: ClassVar[str] = "gone"
    client: bytes = b""
    conn: int | None = None
    release: bool = False
    binary: bytes | None = None


@dataclass
class Control(Message):
    """sys <-> peers housekeeping: reset, uartsetup, UART notices, and their acknowledgements."""
    kind: ClassVar[str] = "ctl"
    op: str
    data: Any = None
    binary: bytes | None = None


class Context:
    """A zmq context whose sockets all close with linger 0."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()

    def router(self, endpoint: str) -> "RouterSocket":
        return RouterSocket(self.ctx, endpoint)

    def dealer(self, endpoint: str, identity: bytes) -> "DealerSocket":
        return DealerSocket(self.ctx, endpoint, identity)

    def term(self) -> None:
        self.ctx.destroy(linger=0)


class _LoopSocket:
    """A plain zmq socket driven by the asyncio loop's reader callback on its file descriptor.

    Cheaper per message than zmq.asyncio (no future per send or receive; a wakeup drains every queued
    message), which matters on the token-stream hot path. The descriptor is edge-triggered: it signals
    a change of the socket's event state, so a wait starts only after ZMQ_EVENTS shows no input, and a
    send (which may consume the signal while processing commands) wakes a waiting receiver itself.
    One coroutine receives on a socket at a time; sends are synchronous and never block. A receiver
    whose handling is synchronous uses serve(): the reader callback itself hands each message over,
    saving a task step (and a loop iteration) per message on the request/reply paths of sys and bridges.
    """

    def __init__(self, sock: zmq.Socket[bytes]):
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()  # the ZMQ_FD option
        self._waiter: asyncio.Future[None] | None = None
        self._handler: Callable[[list[bytes]], None] | None = None  # serve()'s
        self._draining = False
        self._loop.add_reader(self._fd, self._wake)

    def _wake(self) -> None:
        if self._handler is not None:
            self._drain()
        elif self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def serve(self, handler: Callable[[list[bytes]], None]) -> None:
        """Call `handler` with each message as it arrives until the socket closes (then SocketClosed)."""
        self._waiter = self._loop.create_future()
        self._handler = handler
        self._loop.call_soon(self._drain)  # what arrived before
        try:
            await self._waiter
        finally:
            self._waiter = None
            self._handler = None

    def _drain(self) -> None:
        """Hand over what is queued, a batch at a time so that a flood of messages does not hold up the
        loop; reading ZMQ_EVENTS until it shows no input re-arms the edge-triggered descriptor."""
        if self._draining:  # a handler's send found input: this loop takes it
            return
        self._draining = True
        try:
            for _ in range(DRAIN_BATCH):
                handler = self._handler
                if handler is None or self.sock.closed or not self._has_input():
                    return
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
                try:
                    handler(frames)
                except Exception:  # one message's failure must not leave the rest unread
                    log.exception("handling a bus message failed")
            self._loop.call_soon(self._drain)
        finally:
            self._draining = False

    async def recv_frames(self) -> list[bytes]:
        while True:
            if self.sock.closed:
                raise SocketClosed()
            try:
                return self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                pass
            if self._has_input():
                continue
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def send_frames(self, frames: list[bytes]) -> None:
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        finally:
            if self._handler is not None:
                if not self._draining and self._has_input():
                    self._loop.call_soon(self._drain)
            elif self._waiter is not None and self._has_input():
                self._wake()

    def _has_input(self) -> bool:
        # ZMQ_EVENTS is an int option; pyzmq types every option as int | bytes.
        return bool(cast(int, self.sock.getsockopt(_EVENTS)) & _POLLIN)

    def close(self, linger_s: float = 0.0) -> None:
        """Close; a receiver still waiting gets SocketClosed (its loop then moves to the new socket)."""
        self._loop.remove_reader(self._fd)
        self.sock.close(linger=int(linger_s * 1000))
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(SocketClosed())


class RouterSocket:
    """sys's socket. Sends to a peer that has gone raise PeerGone (ROUTER_MANDATORY)."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str):
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A peer reconnecting under its identity (a new socket after sys went silent) takes over at once.
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.setsockopt(zmq.SNDHWM, 100000)
        sock.setsockopt(zmq.RCVHWM, 100000)
        if endpoint.startswith("ipc://"):
            path = endpoint[len("ipc://"):]
            if os.path.exists(path):
                os.unlink(path)
        sock.bind(endpoint)
        if endpoint.startswith("ipc://"):
            os.chmod(endpoint[len("ipc://"):], 0o600)  # owner only, whatever the umask (the run dir is 0700 too)
        self.endpoint = endpoint
        self._monitor = _LoopSocket(sock.get_monitor_socket(zmq.EVENT_DISCONNECTED))
        self._sock = _LoopSocket(sock)

    async def serve(self, handler: Callable[[bytes, Message], None]) -> None:
        """Call `handler` with each peer's message as it arrives (see _LoopSocket.serve); undecodable
        frames are dropped."""
        def frames_in(frames: list[bytes]) -> None:
            try:
                message = Message.decode(frames[1:])
            except BadMessage as exc:
                log.error("undecodable bus message from %r dropped: %s", frames[0], exc)
                return
            handler(frames[0], message)

        await self._sock.serve(frames_in)

    def send(self, identity: bytes, message: Message) -> None:
        try:
            self._sock.send_frames([identity, *message.encode()])
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: no such peer any more (ROUTER_MANDATORY); EAGAIN: its queue is full.
            if exc.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise PeerGone(identity) from None
            raise

    async def disconnected(self) -> None:
        """Wait for the next peer disconnection (kill -9 of a unit shows here at once on ipc)."""
        await self._monitor.recv_frames()

    def close(self) -> None:
        self._sock.sock.disable_monitor()
        self._monitor.close()
        self._sock.close()


class PeerGone(Exception):
    def __init__(self, identity: bytes):
        super().__init__(identity)
        self.identity = identity


def peer_identity(name: str) -> bytes:
    """A process's bus identity, kept across reconnections and sys restarts so that the routes and task
    owners the units hold stay valid (ZeroMQ's generated identities start with a zero byte; these never do)."""
    return f"{name}-{os.getpid()}-{os.urandom(4).hex()}".encode()


class DealerSocket:
    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, identity: bytes):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, identity)
        sock.setsockopt(zmq.SNDHWM, 100000)
        sock.setsockopt(zmq.RCVHWM, 100000)
        sock.connect(endpoint)
        self.endpoint = endpoint
        self._sock = _LoopSocket(sock)

    async def recv(self) -> Message:
        return Message.decode(await self._sock.recv_frames())

    async def serve(self, handler: Callable[[Message], None]) -> None:
        """Call `handler` with each message from sys as it arrives (see _LoopSocket.serve) until the socket
        closes (SocketClosed); undecodable frames are dropped."""
        def frames_in(frames: list[bytes]) -> None:
            try:
                message = Message.decode(frames)
            except BadMessage as exc:
                log.error("undecodable bus message dropped: %s", exc)
                return
            handler(message)

        await self._sock.serve(frames_in)

    def send(self, message: Message) -> None:
        """Queue a message; if sys is unreachable for so long that the queue is full, it is dropped."""
        try:
            self._sock.send_frames(message.encode())
        except zmq.ZMQError as exc:
            log.error("bus send failed (%s): %s dropped", exc, type(message).__name__)

    @property
    def closed(self) -> bool:
        return self._sock.sock.closed

    def close(self, linger_s: float = 0.0) -> None:
        self._sock.close(linger_s)


async def wait_first(*aws: Awaitable[Any]) -> None:
    """Run coroutines until the first one finishes; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            t.result()
    finally:
        for t in tasks:
            t.cancel()
