"""`python -m core.sys`: the sys broker process."""
from __future__ import annotations

import core.notls  # noqa: F401  (before anything imports asyncio)
import asyncio
import logging
import signal
import sys

from core import notify
from core.runtime import trim_loop
from core.settings import Settings, start_process
from core.sys.broker import Broker

log = logging.getLogger("core.sys")


async def main_async(settings: Settings) -> int:
    broker = Broker(settings)
    loop = asyncio.get_running_loop()
    runner = asyncio.create_task(broker.run())
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await broker.ready.wait()
    notify.ready(f"sys on {broker.endpoint}")
    watchdog = asyncio.create_task(notify.watchdog_loop())
    trimmer = asyncio.create_task(trim_loop())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([runner, stopper], return_when=asyncio.FIRST_COMPLETED)
    notify.notify("STOPPING=1")
    for task in (runner, watchdog, trimmer, stopper):
        task.cancel()
    results = await asyncio.gather(runner, watchdog, trimmer, stopper, return_exceptions=True)
    failure = results[0]
    if isinstance(failure, Exception) and not isinstance(failure, asyncio.CancelledError):
        log.error("sys broker failed", exc_info=failure)
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    settings, _ = start_process("unitbus-sys", "the unitbus sys broker", argv)
    sys.exit(asyncio.run(main_async(settings)))


if __name__ == "__main__":
    main()
