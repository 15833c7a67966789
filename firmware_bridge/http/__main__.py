"""`python -m firmware_bridge.http`: every enabled HTTP listener in one process, one bus client of sys."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from core import notify
from core.runtime import trim_loop
from core.settings import Settings, start_process
from firmware_bridge.http import nov1  # noqa: F401  (before FastAPI)
from firmware_bridge.http.app import build
from firmware_bridge.http.dbc import Registrar
from firmware_bridge.http.gateway import Gateway

log = logging.getLogger(__name__)


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        def capture_signals(self):
            # One process runs several servers: signals are handled once, below, for all of them.
            return contextlib.nullcontext()

    return Server


def _protocol_class(header_timeout_s: float):
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        """uvicorn's h11 protocol with a deadline for each request's headers: a connection that opens and
        sends nothing, or sends its headers a byte at a time, is closed instead of held (uvicorn has only
        a keep-alive timeout, which the first byte of a request cancels)."""

        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:
                self._arm()  # a new request starts (or goes on): its headers are due by the deadline
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self.header_timer is None:
                self.header_timer = self.loop.call_later(header_timeout_s, self._expired)

        def _disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _expired(self) -> None:
            self.header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.info("closing a connection from %s: no complete request headers in %.0f s",
                         self.client[0] if self.client else "?", header_timeout_s)
                self.transport.close()

    return HeaderDeadline


async def main_async(settings: Settings) -> None:
    import uvicorn

    gateway = await Gateway(settings).start()
    listeners = build(gateway)
    Server = _server_class()
    bind = settings["http.bind"]
    protocol = _protocol_class(float(settings["http.header_timeout_s"]))
    servers = [Server(uvicorn.Config(listener.app, host=bind, port=listener.port, lifespan="off", access_log=False, http=protocol,
                                     log_level=str(settings["log.level"]).lower(), timeout_graceful_shutdown=3))
               for listener in listeners]
    tasks = [asyncio.create_task(s.serve()) for s in servers]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    while not all(s.started for s in servers) and not any(t.done() for t in tasks):
        await asyncio.sleep(0.05)
    registrar = None
    background = [asyncio.create_task(trim_loop())]
    if settings["http.dbc.enabled"] and any(listener.api == "openai" for listener in listeners):
        port = next(listener.port for listener in listeners if listener.api == "openai")
        url = (settings["http.public_url"] or f"http://{bind}:{port}").rstrip("/") + "/v1/chat/completions"
        registrar = Registrar(settings, lambda: gateway.models(("llm",)), url,
                              lambda state: setattr(gateway, "dbc_state", state))
        background.append(asyncio.create_task(registrar.run()))
    log.info("http listening on %s: %s", bind, ", ".join(f"{listener.api} {listener.port}" for listener in listeners))
    notify.ready("http listening")
    done = asyncio.create_task(stop.wait())
    await asyncio.wait([done, *tasks], return_when=asyncio.FIRST_COMPLETED)
    notify.notify("STOPPING=1")
    for task in background:
        task.cancel()
    if registrar is not None:
        await registrar.unregister()
    for server in servers:
        server.should_exit = True
    await asyncio.gather(*tasks, return_exceptions=True)
    await gateway.close()


def main(argv: list[str] | None = None) -> None:
    settings, _ = start_process("unitbus-http", "OpenAI, Ollama, Ai00 and Jan/Cortex gateways", argv)
    asyncio.run(main_async(settings))


if __name__ == "__main__":
    main()
