"""StackFlow JSON over TCP port 10001 (spec §14.2): many clients at once, each with its own framer."""
from __future__ import annotations

import asyncio
import logging

from core.client import BusClient
from core.envelope import error_reply
from core.errors import ErrorCode
from core.settings import Settings
from firmware_bridge.connection import Connection

log = logging.getLogger(__name__)

IDLE_CHECK_S = 1.0


class TcpServer:
    def __init__(self, client: BusClient, settings: Settings):
        self.client = client
        self.settings = settings
        self.max_connections = int(settings["tcp.max_connections"])
        self.protocols: set[_Protocol] = set()
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

    async def _idle_loop(self) -> None:
        while True:
            await asyncio.sleep(IDLE_CHECK_S)
            for protocol in list(self.protocols):
                if protocol.connection is not None:
                    protocol.connection.check_idle()

    async def close(self) -> None:
        if self._idle_task:
            self._idle_task.cancel()
        if self.server is not None:
            self.server.close()
            for protocol in list(self.protocols):
                protocol.transport.close()
            await self.server.wait_closed()


class _Protocol(asyncio.Protocol):
    def __init__(self, server: TcpServer):
        self.server = server
        self.connection: Connection | None = None
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if len(self.server.protocols) >= self.server.max_connections:
            refusal = error_reply("0", "sys", ErrorCode.NOT_AVAILABLE, "too many connections")
            transport.write(refusal.encode())
            transport.close()
            return
        self.server.protocols.add(self)
        self.connection = Connection(self.server.client, self.server.settings, transport.write,
                                     transport.get_write_buffer_size, str(transport.get_extra_info("peername")))

    def data_received(self, data: bytes) -> None:
        if self.connection is not None:
            try:
                self.connection.received(data)
            except Exception:  # a bug must cost this frame, never the server
                log.exception("%s: frame handling failed", self.connection.label)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.protocols.discard(self)
        if self.connection is not None:
            self.connection.close()
