"""systemd's notify protocol, written in-tree (spec §19): a datagram to $NOTIFY_SOCKET, nothing when unset."""
from __future__ import annotations

import asyncio
import logging
import os
import socket

from core.runtime import trim_loop

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except OSError as exc:
        log.warning("sd_notify %s failed: %s", state.split("=")[0], exc)
        return False


def watchdog_interval_s() -> float | None:
    """Half of WatchdogSec when systemd asked for keep-alives, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6 / 3


async def watchdog_loop() -> None:
    """WATCHDOG=1 from the event loop: a wedged loop stops sending it and systemd restarts the process."""
    interval = watchdog_interval_s()
    if interval is None:
        return
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def ready(status: str) -> None:
    notify(f"READY=1\nSTATUS={status}")


async def serve_until_stopped(status: str) -> None:
    """READY with `status`, the watchdog and the heap trim, then wait for SIGTERM or SIGINT and say STOPPING: a face's
    main loop between its start and its close."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready(status)
    background = [asyncio.create_task(watchdog_loop()), asyncio.create_task(trim_loop())]
    await stop.wait()
    notify("STOPPING=1")
    for task in background:
        task.cancel()
