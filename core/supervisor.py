"""`unitbus up`: sys, the installed faces (bridge, gateways, ...) and the configured units as child processes.

A child that dies is restarted (with a growing delay if it keeps dying); Ctrl-C or SIGTERM stops
everything: SIGTERM first, SIGKILL for what is still running after a grace period.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Coroutine

from core import registry

log = logging.getLogger(__name__)

STOP_GRACE_S = 8.0
MAX_BACKOFF_S = 10.0
STABLE_AFTER_S = 30.0  # a child that ran this long has its restart delay reset
RESTART_EXIT = 75  # exit status of a unit asking to be started afresh (sys.reset, spec §7.4)


@dataclass
class Child:
    name: str
    module: str
    args: list[str] = field(default_factory=list)
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    backoff: float = 0.5
    restarts: int = 0


def plan(settings: Any) -> list[Child]:
    children = [Child("sys", "core.sys")]
    for face in registry.faces().values():
        wanted = face.planned(settings)
        if wanted and not face.available():
            missing = [m for m in face.requires if not registry.module_exists(m)]
            log.info("%s not started: it needs %s, which is not installed", face.name, " ".join(missing))
            continue
        children.extend(Child(process.name, process.module) for process in wanted)
    installed = registry.installed()
    for unit in settings["up.units"] or registry.default_units():
        info = installed.get(unit)
        if info is not None:
            children.append(Child(unit, info.module))
        else:
            log.warning("no unit named %s is installed (installed: %s); skipped", unit, " ".join(installed))
    return children


class Supervisor:
    def __init__(self, children: list[Child], overrides: dict[str, Any], config: str | None):
        self.children = children
        self.env = dict(os.environ)
        if overrides:
            self.env["UNITBUS_OVERRIDES"] = json.dumps(overrides)
        if config:
            self.env["UNITBUS_CONFIG"] = str(config)
        self.env["UNITBUS_SUPERVISED"] = "1"  # units exit on sys.reset to be started afresh
        self.stopping = False
        self._watchers: list[asyncio.Task[None]] = []

    async def start_child(self, child: Child) -> None:
        child.process = await asyncio.create_subprocess_exec(sys.executable, "-m", child.module, *child.args,
                                                             env=self.env)
        child.started = time.monotonic()
        log.info("started %s (pid %d)", child.name, child.process.pid)

    async def watch(self, child: Child) -> None:
        while not self.stopping:
            assert child.process is not None
            code = await child.process.wait()
            if self.stopping:
                return
            ran = time.monotonic() - child.started
            if code == RESTART_EXIT:  # asked for (sys.reset): at once, and no sign of trouble
                log.info("%s restarts (sys.reset)", child.name)
                child.restarts += 1
                await self.start_child(child)
                continue
            if ran > STABLE_AFTER_S:
                child.backoff = 0.5
            log.warning("%s exited with %s after %.1f s; restarting in %.1f s", child.name, code, ran, child.backoff)
            await asyncio.sleep(child.backoff)
            child.backoff = min(MAX_BACKOFF_S, child.backoff * 2)
            child.restarts += 1
            if not self.stopping:
                await self.start_child(child)

    async def run(self, ready_check: Callable[[], Coroutine[Any, Any, Any]] | None = None) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        for child in self.children:
            await self.start_child(child)
        self._watchers = [asyncio.create_task(self.watch(c)) for c in self.children]
        if ready_check is not None:
            asyncio.create_task(ready_check())
        await stop.wait()
        await self.stop()
        return 0

    async def stop(self) -> None:
        self.stopping = True
        for task in self._watchers:
            task.cancel()
        running = [c for c in reversed(self.children) if c.process and c.process.returncode is None]
        for child in running:
            child.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        for child in running:
            try:
                await asyncio.wait_for(child.process.wait(), STOP_GRACE_S)  # type: ignore[union-attr]
            except asyncio.TimeoutError:
                log.warning("%s did not stop in %.0f s: killing it", child.name, STOP_GRACE_S)
                child.process.kill()  # type: ignore[union-attr]
                await child.process.wait()  # type: ignore[union-attr]
        log.info("all stopped")
