"""StackFlow JSON over TCP port 10001 (spec §14.2): many clients at once, each with its own framer."""
from __future__ import annotations

import asyncio
import logging
import time

from core.client import BusClient
from core.envelope import error_reply
from core.errors import ErrorCode
from core.settings import Settings
from firmware_bridge.connection import Connection

log = logging.getLogger(__name__)

IDLE_CHECK_S = 1.0
# Fairness (spec §14.2): a connection's received bytes are framed a piece at a time, for at most TURN_S
# per turn of the event loop, then the other connections and the bus get their turn.
PIECE_BYTES = 128
TURN_S = 0.0005
BUSY_RETRY_S = 0.005  # how soon a connection with too many requests in flight is looked at again


def per_address_share(settings: Settings) -> int:
    """tcp.max_connections_per_address; 0 means half of tcp.max_connections (at least 1)."""
    share = int(settings["tcp.max_connections_per_address"])
    return share if share > 0 else max(1, int(settings["tcp.max_connections"]) // 2)


class TcpServer:
    def __init__(self, client: BusClient, settings: Settings):
        self.client = client
        self.settings = settings
        self.max_connections = int(settings["tcp.max_connections"])
        self.share = per_address_share(settings)
        self.idle_timeout_s = float(settings["tcp.idle_timeout_s"])
        self.max_pending = int(settings["framing.max_pending_bytes"])
        self.protocols: set[_Protocol] = set()
        self.per_address: dict[str, int] = {}
        self.server: asyncio.base_events.Server | None = None
        self._idle_task: asyncio.Task | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Protocol(self), self.settings["tcp.bind"],
                                               int(self.settings["tcp.port"]), reuse_address=True)
        self._idle_task = asyncio.create_task(self._idle_loop())
        log.info("StackFlow TCP on %s:%s", self.settings["tcp.bind"], self.settings["tcp.port"])

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    def make_room(self, address: str) -> bool:
        """All slots are taken and `address` wants one: if another address holds more than its share, its
        connection that owns no task and was quiet longest is closed for the newcomer (spec §14.2)."""
        if self.per_address.get(address, 0) >= self.share:
            return False
        victims = [p for p in self.protocols if p.connection is not None and not p.connection.tasks
                   and p.address != address and self.per_address.get(p.address, 0) > self.share]
        if not victims:
            return False
        victim = max(victims, key=lambda p: p.connection.idle_s if p.connection is not None else 0.0)
        log.info("%s: closed to make room for %s (over the share of %d connections per address)",
                 victim.address, address, self.share)
        victim.transport.abort()  # not close(): a client that never reads would keep the slot while it drains
        victim.release()  # its slot is free now, not when the close completes
        return True

    async def _idle_loop(self) -> None:
        while True:
            await asyncio.sleep(IDLE_CHECK_S)
            for protocol in list(self.protocols):
                connection = protocol.connection
                if connection is None or protocol.backlog:  # bytes still to frame: not idle, whatever the clock
                    continue
                connection.check_idle()
                if self.idle_timeout_s > 0 and connection.idle_s >= self.idle_timeout_s and not connection.tasks:
                    log.info("%s: closed after %.0f s without traffic and without a task", connection.label,
                             connection.idle_s)
                    if protocol.transport.get_write_buffer_size():
                        protocol.transport.abort()  # it reads nothing: close() would wait for it forever
                    else:
                        protocol.transport.close()
                    protocol.release()

    async def close(self) -> None:
        if self._idle_task:
            self._idle_task.cancel()
        if self.server is not None:
            self.server.close()
            for protocol in list(self.protocols):
                protocol.transport.close()
            await self.server.wait_closed()


class _Protocol(asyncio.Protocol):
    """One TCP connection. Backpressure: while its output is over framing.max_pending_bytes, or bytes it
    sent are still waiting to be framed, nothing more is read from it (spec §13.3)."""

    def __init__(self, server: TcpServer):
        self.server = server
        self.connection: Connection | None = None
        self.transport: asyncio.Transport
        self.address = ""
        self.backlog = bytearray()  # received, not yet framed: at most one read
        self._writable = True
        self._reading = True
        self._turn: asyncio.Handle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        server = self.server
        if len(server.protocols) >= server.max_connections and not server.make_room(self.address):
            refusal = error_reply("0", "sys", ErrorCode.NOT_AVAILABLE, "too many connections")
            transport.write(refusal.encode())
            transport.close()
            return
        server.protocols.add(self)
        server.per_address[self.address] = server.per_address.get(self.address, 0) + 1
        transport.set_write_buffer_limits(high=server.max_pending, low=server.max_pending // 2)
        self.connection = Connection(server.client, server.settings, transport.write,
                                     transport.get_write_buffer_size, str(peer))

    def data_received(self, data: bytes) -> None:
        if self.connection is None:
            return
        self.backlog += data
        if self._turn is None:  # else a turn is already due
            self._take_turn()

    def _take_turn(self) -> None:
        self._turn = None
        connection = self.connection
        if connection is None or connection.closed:
            return
        deadline = time.monotonic() + TURN_S
        busy = False
        while self.backlog and self._writable:
            if connection.busy():
                busy = True
                break
            piece = bytes(self.backlog[:PIECE_BYTES])
            del self.backlog[:PIECE_BYTES]
            try:
                connection.received(piece)
            except Exception:  # a bug must cost this piece, never the server
                log.exception("%s: frame handling failed", connection.label)
            if time.monotonic() >= deadline:
                break
        if busy:
            self._turn = asyncio.get_running_loop().call_later(BUSY_RETRY_S, self._take_turn)
        elif self.backlog and self._writable:
            self._turn = asyncio.get_running_loop().call_soon(self._take_turn)
        self._set_reading(self._writable and not self.backlog)

    def _set_reading(self, reading: bool) -> None:
        if reading != self._reading and not self.transport.is_closing():
            self._reading = reading
            if reading:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def pause_writing(self) -> None:
        self._writable = False
        self._set_reading(False)

    def resume_writing(self) -> None:
        self._writable = True
        if self._turn is None:
            self._take_turn()

    def release(self) -> None:
        """Give back this connection's slot (once)."""
        server = self.server
        if self in server.protocols:
            server.protocols.discard(self)
            left = server.per_address.get(self.address, 1) - 1
            if left:
                server.per_address[self.address] = left
            else:
                server.per_address.pop(self.address, None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._turn is not None:
            self._turn.cancel()
        self.release()
        if self.connection is not None:
            self.connection.close()
