"""`python -m firmware_bridge.http`: every enabled HTTP listener in one process, one bus client of sys."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

from core import logs, notify
from core.settings import Settings
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


async def main_async(settings: Settings) -> None:
    import uvicorn

    gateway = await Gateway(settings).start()
    listeners = build(gateway)
    Server = _server_class()
    bind = settings["http.bind"]
    servers = [Server(uvicorn.Config(l.app, host=bind, port=l.port, lifespan="off", access_log=False,
                                     log_level=str(settings["log.level"]).lower(), timeout_graceful_shutdown=3))
               for l in listeners]
    tasks = [asyncio.create_task(s.serve()) for s in servers]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    while not all(s.started for s in servers) and not any(t.done() for t in tasks):
        await asyncio.sleep(0.05)
    registrar = None
    background = []
    if settings["http.dbc.enabled"] and any(l.api == "openai" for l in listeners):
        port = next(l.port for l in listeners if l.api == "openai")
        url = (settings["http.public_url"] or f"http://{bind}:{port}").rstrip("/") + "/v1/chat/completions"
        registrar = Registrar(settings, lambda: gateway.models(("llm",)), url,
                              lambda state: setattr(gateway, "dbc_state", state))
        background.append(asyncio.create_task(registrar.run()))
    log.info("http listening on %s: %s", bind, ", ".join(f"{l.api} {l.port}" for l in listeners))
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
    parser = argparse.ArgumentParser(prog="unitbus-http", description="OpenAI, Ollama, Ai00 and Jan/Cortex gateways")
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    settings = Settings.load(args.config, args.set)
    logs.configure(settings["log.level"], "http")
    asyncio.run(main_async(settings))


if __name__ == "__main__":
    main()
