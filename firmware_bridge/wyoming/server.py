"""The Wyoming server: one TCP listener, one task pool (one bus client), one Connection per client.

`describe` is answered from the last catalogue sys gave (refreshed in the background, and read from the
local manifests before sys first answers), so it never waits for sys, a unit or a model load.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from functools import partial
from typing import Any

from wyoming.info import Info
from wyoming.server import AsyncTcpServer

from core.errors import ErrorCode, UnitError
from core.settings import Settings
from firmware_bridge.pool import PoolError, Served, TaskPool
from firmware_bridge.wyoming.handler import Connection
from firmware_bridge.wyoming.info import WakeWord, build_info, languages, wake_words

log = logging.getLogger(__name__)

CATALOGUE_REFRESH_S = 5.0
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class WyomingServer:
    def __init__(self, settings: Settings, port: int | None = None):
        self.settings = settings
        self.bind = str(settings["wyoming.bind"])
        self.port = int(settings["wyoming.port"]) if port is None else port
        self.pool = TaskPool(settings, name="wyoming", keep_alive=settings["wyoming.keep_alive"],
                             preload=settings["wyoming.preload"], preload_setup=self.setup_for)
        self.tcp = AsyncTcpServer(self.bind, self.port)
        self._refresher: asyncio.Task | None = None
        self._zeroconf: Any = None
        self._local: list[dict] = [m.data for m in self.pool.store.all()]

    async def start(self) -> "WyomingServer":
        await self.pool.start()
        self._refresher = asyncio.create_task(self._refresh_loop())
        await self.tcp.start(partial(Connection, self))
        if self.port == 0:  # tests: the port the system chose
            self.port = self.tcp._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        if zeroconf_wanted(self.settings):
            await self._advertise()
        return self

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        if self._zeroconf is not None:
            await self._zeroconf.async_unregister_all_services()
            await self._zeroconf.async_close()
        await self.tcp.stop()
        await self.pool.close()

    # what describe says ------------------------------------------------------------------------
    def manifests(self) -> list[dict]:
        return self.pool.cached_catalogue() or self._local

    def info(self) -> Info:
        return build_info(self.manifests(), str(self.settings["wyoming.handle_model"]))

    def wake_words(self) -> list[WakeWord]:
        return wake_words(self.manifests())

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.pool.catalogue(), timeout=CATALOGUE_REFRESH_S)
            except (UnitError, asyncio.TimeoutError) as exc:
                log.debug("catalogue not refreshed: %s", exc)
            await asyncio.sleep(CATALOGUE_REFRESH_S)

    # tasks -------------------------------------------------------------------------------------
    def setup_for(self, manifest: dict) -> dict[str, Any]:
        """The setup of the server's task for a model (the same for every request, so tasks are shared)."""
        if manifest.get("type") == "kws":
            return {"kws": [w.name for w in wake_words([manifest])]}  # every wake word: clients choose
        return {}

    async def acquire(self, kind: str, name: str | None = None, language: str | None = None) -> Served:
        """The loaded task of the named model of a kind, or of its first model."""
        manifest = await self.find(kind, name, language)
        try:
            return await self.pool.acquire(manifest, setup=self.setup_for(manifest))
        except UnitError as exc:
            if exc.code in (ErrorCode.UNIT_CALL, ErrorCode.UNIT_NOT_EXIST) and not await self.running(kind):
                raise PoolError(ErrorCode.UNIT_NOT_EXIST, message=f"the {kind} unit is not running") from None
            raise

    async def running(self, unit: str) -> bool:
        """Whether the unit is registered with sys (sys.version2 lists llm_<unit>-<version>)."""
        try:
            response = await self.pool.client.call("sys", "version2", timeout=2.0)
        except (UnitError, asyncio.TimeoutError):
            return True  # sys itself is not answering: say that, not that the unit is missing
        return any(str(v).split("-")[0] == f"llm_{unit}" for v in response.data or [])

    async def find(self, kind: str, name: str | None, language: str | None) -> dict:
        models = await self.pool.models((kind,))
        if not models:
            raise PoolError(ErrorCode.MODEL_LOADING, message=f"no {kind} model is installed (see sys.lsmode)")
        if name and not name.startswith("unitbus-"):  # a program name means its first model
            manifest = await self.pool.find(name, (kind,))
        elif language:
            manifest = next((m for m in models if speaks(m, language)), models[0])
        else:
            manifest = models[0]
        if language and kind in ("asr", "tts") and not speaks(manifest, language):
            raise PoolError(ErrorCode.MODEL_LOADING, message=f"{manifest['mode']} does not speak {language} "
                            f"(it speaks {', '.join(spoken(manifest))})")
        return manifest

    # zeroconf ----------------------------------------------------------------------------------
    async def _advertise(self) -> None:
        from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

        host = self.bind if self.bind not in ("0.0.0.0", "", "::") else outward_address()
        name = str(self.settings["wyoming.zeroconf_name"]) or f"unitbus-{socket.gethostname()}"
        info = AsyncServiceInfo("_wyoming._tcp.local.", f"{name}._wyoming._tcp.local.",
                                addresses=[socket.inet_aton(host)], port=self.port,
                                server=f"{socket.gethostname()}.local.")
        self._zeroconf = AsyncZeroconf()
        await self._zeroconf.async_register_service(info)
        log.info("advertised %s on %s:%d (zeroconf)", name, host, self.port)


def spoken(manifest: dict) -> list[str]:
    return languages(manifest, regional=True) + languages(manifest)


def speaks(manifest: dict, language: str) -> bool:
    """"en", "en-US" and "en_US" match a model that speaks English."""
    wanted = language.replace("-", "_").lower()
    return any(code.lower() == wanted or code.lower() == wanted.split("_")[0] for code in spoken(manifest))


def zeroconf_wanted(settings: Settings) -> bool:
    value = str(settings["wyoming.zeroconf"]).lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return str(settings["wyoming.bind"]) not in LOOPBACK  # auto: only where other machines can connect


def outward_address() -> str:
    """The address other hosts reach this one at (the interface of the default route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("224.0.0.251", 5353))  # no packet is sent: this only picks the interface
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"
