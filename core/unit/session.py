"""A unit process's session with sys (spec §5, §19): its socket, hello, heartbeats and the receive loop.

The zguide's Majordomo worker: register, heartbeat, notice a silent sys and register again. What the
messages mean is the Unit's business (`dispatch`, `registered_again`); this half only keeps the line up.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, ClassVar

from core import bus
from core.envelope import Response
from core.settings import Settings

log = logging.getLogger(__name__)


class Session:
    """The bus half of a Unit. Subclasses implement `dispatch` and `registered_again`."""

    name: ClassVar[str]
    names: ClassVar[tuple[str, ...]]
    version: ClassVar[str]
    features: ClassVar[tuple[str, ...]]

    def __init__(self, settings: Settings):
        self.endpoint = settings.bus_endpoint()
        self.key = settings.bus_key()
        self.heartbeat_s = float(settings["bus.heartbeat_s"])
        self.liveness_s = float(settings["bus.liveness_s"])
        self._ctx = bus.Context()
        self.identity = bus.peer_identity(self.name)
        self.sock: bus.DealerSocket | None = None
        self.epoch = 0  # counts registrations with sys: a setup that outlives one is not announced
        self._refusal: Any = None  # the last reason sys gave for refusing this unit
        self.loop: asyncio.AbstractEventLoop | None = None
        self._last_from_sys = time.monotonic()
        self.registered = asyncio.Event()

    def actions(self) -> list[str]:
        raise NotImplementedError

    def published_sources(self) -> dict[str, str]:
        """The sources this unit publishes with no task behind them: "" when offered, else why not."""
        return {}

    async def dispatch(self, message: bus.Message) -> None:
        """Event loop: one message from sys (other than the session's own)."""
        raise NotImplementedError

    def registered_again(self, why: str) -> None:
        """Event loop: the unit registered again (sys restarted or lost us); re-announce what it holds."""
        raise NotImplementedError

    # sending -----------------------------------------------------------------------------------
    def send(self, message: bus.Message) -> None:
        # The socket is gone once the unit stopped; a worker thread's last outputs may still arrive.
        if self.sock is not None and not self.sock.closed:
            self.sock.send(message)

    def send_threadsafe(self, message: bus.Msg) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self.send, message)

    def publish(self, source: str, binary: bytes | None = None, data: Any = None) -> None:
        """Thread-safe: publish under a source name with no task behind it (the audio unit's sys.pcm).

        sys delivers it to the tasks subscribed to `source` and to units that declared the feature
        `sink:<source>` (how tts hands audio to the audio unit's player)."""
        response = None if data is None else Response("0", source, source, data).to_dict()
        self.send_threadsafe(bus.Msg(response=response, publish=source, binary=binary))

    # the line to sys ---------------------------------------------------------------------------
    def connect(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = self._ctx.dealer(self.endpoint, self.identity)

    def hello(self) -> None:
        self.send(bus.Hello(role="unit", name=self.name, names=list(self.names or (self.name,)),
                            actions=self.actions(), version=self.version, features=list(self.features), key=self.key,
                            sources=self.published_sources()))
        self._last_from_sys = time.monotonic()

    def register_again(self, why: str) -> None:
        self.epoch += 1
        self.hello()
        self.registered_again(why)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.send(bus.Gone())  # goodbye: sys lets the process that replaces this one register
            self.sock.close(linger_s=bus.GOODBYE_LINGER_S)
        self._ctx.term()

    async def heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            self.send(bus.Heartbeat())
            if time.monotonic() - self._last_from_sys > self.liveness_s:
                log.warning("sys silent for %.1f s: connecting and registering again", self.liveness_s)
                self.connect()
                self.register_again("sys stopped answering")

    async def receive_loop(self) -> None:
        while True:
            assert self.sock is not None
            try:
                message = await self.sock.recv()
            except asyncio.CancelledError:
                raise
            except bus.SocketClosed:  # connect() replaced the socket: receive on the new one
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
                await self._session_message(message)
            except Exception:
                log.exception("error while handling %s", type(message).__name__)

    async def _session_message(self, message: bus.Message) -> None:
        if isinstance(message, bus.Hello):
            if self._refusal is None:  # a refused unit is asked every heartbeat: no news
                log.warning("sys does not know this unit (it restarted): registering again")
            self.register_again("sys restarted")
        elif isinstance(message, bus.Control) and message.op == "refused":
            if message.data != self._refusal:  # it asks again every heartbeat: say it once
                log.error("sys refused this unit: %s", message.data)
            self._refusal = message.data
        else:
            await self.dispatch(message)
