"""The bridges' task pool: model catalogue, pool-owned tasks and their lifecycle (http-apis.md §1.2-§1.6).

Every face that serves models to clients of its own (the HTTP gateways, Wyoming) goes through a `TaskPool`:
it resolves model names and aliases, loads a model the first time a request needs it (one `setup` shared by
all waiting requests), unloads idle tasks after their keep-alive, and turns an inference into an async
iterator of unit outputs. Failures are `UnitError`s with StackFlow codes; each face maps them to its own
wire. No model code and no protocol of a face lives here.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterable

from core.client import BusClient
from core.envelope import Request, Response
from core.errors import ErrorCode, UnitError
from core.manifest import ManifestStore
from core.paths import resolve_pkg_url
from core.settings import Settings

log = logging.getLogger(__name__)

CATALOGUE_TTL_S = 2.0
# With fleet.balance: an inference for any board of the fleet serving the model (docs/protocol.md, the fleet).
BALANCED = "llm@*"

# What a pool task of each unit kind is set up with (the bus work_id and the setup data); a face serving
# other units' models gives theirs to its pool (task_setup).
TASK_SETUP: dict[str, tuple[str, dict[str, Any]]] = {
    "llm": ("llm", {"response_format": "llm.utf-8.stream", "input": "llm.utf-8", "enoutput": True}),
    "asr": ("whisper", {"response_format": "asr.utf-8", "input": "whisper.base64", "enoutput": True}),
    # Streamed: a sentence's first audio reaches Wyoming and HTTP clients before its end is synthesised.
    "tts": ("tts", {"response_format": "tts.pcm.stream.base64", "input": "tts.utf-8", "enoutput": True}),
    "kws": ("kws", {"response_format": "kws.json", "input": "kws.wav.base64", "enoutput": True,
                    "enwake_audio": False}),
}


class PoolError(UnitError):
    """A UnitError with the pool's advice: which request field is at fault, when a retry may succeed."""

    def __init__(self, code: ErrorCode, detail: str | None = None, *, message: str | None = None,
                 param: str | None = None, retry_after: float | None = None):
        super().__init__(code, detail, message=message)
        self.param = param
        self.retry_after = retry_after


class ModelNotFound(PoolError):
    """No installed model has this name or alias (found before anything loads)."""

    def __init__(self, name: str):
        super().__init__(ErrorCode.MODEL_LOADING, message=f"The model '{name}' does not exist", param="model")
        self.name = name


class ModelInUse(PoolError):
    """The model cannot be removed while a task (`work_id`) uses it."""

    def __init__(self, work_id: str):
        super().__init__(ErrorCode.OPERATION_FAILED, message=f"model in use by {work_id}")
        self.work_id = work_id


def parse_duration(value: Any) -> float | None:
    """A keep-alive: "5m", "1h30m", "10s", "300ms", a number of seconds; negative = forever (None)."""
    if value is None or value == "":
        raise ValueError("empty duration")
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            parts = re.findall(r"(-?\d+(?:\.\d+)?)(ms|h|m|s)", text)
            if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
                raise ValueError(f"invalid duration {value!r}") from None
            scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
            seconds = sum(float(n) * scale[u] for n, u in parts)
    return None if seconds < 0 else seconds


@dataclass
class Served:
    """A pool-owned task serving one model."""

    mode: str
    unit: str
    work_id: str = ""
    state: str = "loading"  # loading, loaded, unloading
    error: str = ""
    keep_alive: float | None = 300.0
    preload: bool = False
    inflight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    loaded_at: float = 0.0
    load_ms: float = 0.0
    setup: dict[str, Any] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)  # the load's last {"stage", "percent"} from the unit
    durations: collections.deque = field(default_factory=lambda: collections.deque(maxlen=8))
    ready: asyncio.Future | None = None

    def expires_at(self) -> float | None:
        """Wall-clock time of the keep-alive unload, None for never."""
        if self.keep_alive is None or self.preload:
            return None
        return time.time() + (self.last_used + self.keep_alive - time.monotonic())


class TaskPool:
    """One bus client's models and tasks. `name` prefixes its request ids; `keep_alive` is the default idle
    time before a task is unloaded; `max_queue` is each llm task's queue; `preload` names models loaded at
    start and kept, set up with `preload_setup(manifest)` when given; with `abort_load_on_disconnect` a
    load stops when the request that started it is cancelled (otherwise it goes on, so a retry finds the
    model loaded); with `balance` (default: the fleet.balance setting) llm inferences go to `llm@*`, any
    board of the fleet that serves the model, and nothing is loaded here for them. `task_setup` adds or
    replaces entries of TASK_SETUP for this pool's unit kinds."""

    def __init__(self, settings: Settings, client: BusClient | None = None, *, name: str = "pool",
                 keep_alive: Any = "5m", max_queue: int = 8, preload: Iterable[str] = (),
                 preload_setup: Callable[[dict], dict[str, Any]] | None = None,
                 abort_load_on_disconnect: bool = False, balance: bool | None = None,
                 task_setup: dict[str, tuple[str, dict[str, Any]]] | None = None):
        self.settings = settings
        self.task_setup = {**TASK_SETUP, **(task_setup or {})}
        fleet_on = bool(settings.get("fleet.url") or settings.get("fleet.serve"))
        self.balance = fleet_on and bool(settings.get("fleet.balance")) if balance is None else balance
        self.balanced: dict[tuple[str, str], Served] = {}
        self.name = name
        self.client = client or BusClient.for_settings(settings, name)
        self.store = ManifestStore(settings.as_dict())
        self.served: dict[tuple[str, str], Served] = {}
        self.running: dict[str, Served] = {}  # request_id -> task, for cancel()
        self.preload = list(preload)
        self.preload_setup = preload_setup
        self.preload_errors: dict[str, str] = {}
        self.default_keep_alive = parse_duration(keep_alive)
        self.max_queue = int(max_queue)
        self.abort_load_on_disconnect = bool(abort_load_on_disconnect)
        self._catalogue: list[dict] = []
        self._catalogue_at = 0.0
        self._bg: set[asyncio.Task] = set()
        self._reaper: asyncio.Task | None = None

    # lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> "TaskPool":
        await self.client.start()
        self._reaper = asyncio.create_task(self._reap_loop())
        for name in self.preload:
            self.spawn(self._preload(name))
        return self

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for task in list(self._bg):
            task.cancel()
        # The tasks were set up with exit_on_disconnect, so this is only the orderly path: keep it short.
        exits = [self.client.call(s.work_id, "exit", timeout=2.0) for s in self.served.values()
                 if s.work_id and s.state == "loaded"]
        await asyncio.gather(*exits, return_exceptions=True)
        await self.client.close()

    def spawn(self, coro) -> asyncio.Task:
        """A background task kept referenced until done (cleanup that must survive a cancelled request)."""
        task = asyncio.create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)
        return task

    async def _preload(self, name: str) -> None:
        # At boot the units may not have registered with sys yet: retry while they are missing.
        deadline = time.monotonic() + float(self.settings["timeouts.setup_s"])
        while True:
            try:
                manifest = await self.find(name, tuple(self.task_setup))
                setup = self.preload_setup(manifest) if self.preload_setup is not None else None
                await self.acquire(manifest, preload=True, setup=setup)
                return
            except UnitError as exc:
                if exc.code in (ErrorCode.UNIT_NOT_EXIST, ErrorCode.UNIT_CALL) and time.monotonic() < deadline:
                    await asyncio.sleep(1.0)
                    continue
                self.preload_errors[name] = exc.message
                log.error("preload of %s failed: %s", name, exc.message)
                return

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for served in list(self.served.values()):
                if (served.state == "loaded" and not served.inflight and not served.preload
                        and served.keep_alive is not None and now - served.last_used >= served.keep_alive):
                    log.info("unloading %s (%s) after %.0f s idle", served.mode, served.work_id, now - served.last_used)
                    try:
                        await self.unload(served.mode, served.unit)
                    except Exception:  # the reaper must outlive one failed unload
                        log.exception("unloading %s failed", served.mode)

    # catalogue ----------------------------------------------------------------------------------
    async def catalogue(self) -> list[dict]:
        """Every installed model (sys.lsmode), asked again at most every CATALOGUE_TTL_S."""
        if time.monotonic() - self._catalogue_at > CATALOGUE_TTL_S:
            try:
                response = await self.client.call("sys", "lsmode", timeout=float(self.settings["timeouts.control_s"]))
            except (UnitError, asyncio.TimeoutError) as exc:
                raise PoolError(ErrorCode.UNIT_CALL, message=f"sys is not answering: {exc}", retry_after=2) from None
            self._catalogue = [m for m in response.data if isinstance(m, dict) and "mode" in m]
            self._catalogue_at = time.monotonic()
        return self._catalogue

    def cached_catalogue(self) -> list[dict]:
        """The last catalogue fetched, without asking sys (empty before the first answer)."""
        return self._catalogue

    async def models(self, types: tuple[str, ...] = ("llm",)) -> list[dict]:
        return [m for m in await self.catalogue() if m.get("type") in types]

    async def find(self, name: Any, types: tuple[str, ...] = ("llm",)) -> dict:
        """The manifest for a model name or alias (case-insensitive, `_` = `-`); ModelNotFound before
        anything loads."""
        if not isinstance(name, str) or not name:
            raise PoolError(ErrorCode.JSON_FORMAT, message="model is required", param="model")
        candidates = await self.models(types)
        norm = name.lower().replace("_", "-")
        for test in (lambda a: a == name, lambda a: a.lower().replace("_", "-") == norm):
            for manifest in candidates:
                if test(manifest["mode"]):
                    return manifest
            for manifest in candidates:
                if any(test(alias) for alias in manifest.get("aliases", [])):
                    return manifest
        raise ModelNotFound(name)

    def meta(self, manifest: dict) -> dict[str, Any]:
        """Facts from the manifest file itself: mtime, SHA-256, bytes of the model files."""
        found = self.store.find_exact(manifest["mode"])
        path = found.path if found is not None else None
        try:
            raw = path.read_bytes() if path else b""
            mtime = path.stat().st_mtime if path else 0.0
        except OSError:
            raw, mtime = b"", 0.0
        size = 0
        for value in manifest.get("mode_param", {}).values():
            if isinstance(value, str) and value.startswith("pkg://"):
                try:
                    target = resolve_pkg_url(value)
                    size += sum(p.stat().st_size for p in target.rglob("*") if p.is_file()) if target.is_dir() \
                        else target.stat().st_size
                except (OSError, LookupError, ValueError):
                    continue
        return {"mtime": mtime, "digest": hashlib.sha256(raw).hexdigest(), "size": size,
                "path": str(path) if path else ""}

    async def tasks(self) -> list[dict]:
        """Every task on the bus (sys.lstask), including UART/TCP-owned ones."""
        try:
            response = await self.client.call("sys", "lstask", timeout=float(self.settings["timeouts.control_s"]))
        except (UnitError, asyncio.TimeoutError):
            return []
        return [t for t in response.data if isinstance(t, dict)] if isinstance(response.data, list) else []

    def state(self, mode: str, unit: str = "llm") -> str:
        served = self.served.get((unit, mode))
        return served.state if served is not None else "available"

    async def ping(self) -> bool:
        try:
            await self.client.call("sys", "ping", timeout=2.0)
            return True
        except (UnitError, asyncio.TimeoutError):
            return False

    # tasks --------------------------------------------------------------------------------------
    async def acquire(self, manifest: dict, *, keep_alive: Any = "default", preload: bool = False,
                      setup: dict[str, Any] | None = None) -> Served:
        """The loaded pool task of a model, loading it if needed. A load outlives the request that
        started it (the client may retry), unless abort_load_on_disconnect."""
        unit = manifest["type"]
        if unit not in self.task_setup:
            raise PoolError(ErrorCode.MODEL_LOADING, message=f"The model '{manifest['mode']}' is a {unit} model, "
                                                             f"which {self.name} does not serve", param="model")
        key = (unit, manifest["mode"])
        if self.balance and unit == "llm":
            served = self.balanced.get(key)
            if served is None or served.setup != (setup or {}):
                served = Served(manifest["mode"], unit, BALANCED, "loaded", setup=dict(setup or {}))
                self.balanced[key] = served
            served.last_used = time.monotonic()
            return served
        while True:  # an unload in flight finishes first; then look again (another request may have loaded)
            served = self.served.get(key)
            if served is not None and served.state == "unloading" and served.ready is not None:
                await asyncio.shield(served.ready)
                continue
            if served is not None and setup is not None and served.setup != setup and served.state == "loaded" \
                    and not served.inflight:
                await self.unload(manifest["mode"], unit)  # started with other settings: reload
                continue
            break
        if served is None:
            served = Served(manifest["mode"], unit, keep_alive=self.default_keep_alive, preload=preload,
                            setup=dict(setup or {}))
            served.ready = asyncio.get_running_loop().create_future()
            self.served[key] = served
            load = self.spawn(self._load(served, manifest))
        else:
            load = None
            served.preload = served.preload or preload
        if keep_alive != "default":
            served.keep_alive = keep_alive
        served.last_used = time.monotonic()
        assert served.ready is not None
        try:
            await asyncio.shield(served.ready)
        except asyncio.CancelledError:
            if load is not None and self.abort_load_on_disconnect:
                load.cancel()
            raise
        return served

    async def _load(self, served: Served, manifest: dict) -> None:
        assert served.ready is not None
        bus_name, base = self.task_setup[served.unit]
        data = {**base, "model": manifest["mode"], "exit_on_disconnect": True, **served.setup}
        if served.unit == "llm":
            data["max_queue"] = self.max_queue
        started = time.monotonic()
        try:
            await self._make_room(served, manifest)
            response = await self._setup(bus_name, data, served)
            served.work_id = response.work_id
            served.state = "loaded"
            served.loaded_at = time.time()
            served.load_ms = (time.monotonic() - started) * 1000
            served.last_used = time.monotonic()
            log.info("loaded %s as %s in %.0f ms", served.mode, served.work_id, served.load_ms)
            served.ready.set_result(served)
        except BaseException as exc:
            self.served.pop((served.unit, served.mode), None)
            if isinstance(exc, UnitError):
                error = exc
            elif isinstance(exc, asyncio.CancelledError):
                error = PoolError(ErrorCode.NOT_AVAILABLE, message="model load cancelled", retry_after=1)
            else:
                log.exception("loading %s failed", served.mode)
                error = PoolError(ErrorCode.MODEL_LOADING, message=f"Model loading failed: {exc}")
            served.error = error.message
            served.ready.set_exception(error)
            served.ready.exception()  # retrieved here: nobody may be waiting any more
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def _setup(self, bus_name: str, data: dict, served: Served):
        timeout = float(self.settings["timeouts.setup_s"]) + 5.0
        for attempt in (0, 1):
            request = Request(f"{self.name}-setup-{served.mode}", bus_name, "setup", f"{bus_name}.setup",
                              {**data, "progress": True})
            try:
                response = await asyncio.wait_for(self._setup_reply(request, served), timeout)
            except asyncio.TimeoutError:
                raise PoolError(ErrorCode.TIMEOUT, message=f"timeout: loading {served.mode} exceeded "
                                                           f"{timeout:.0f} s") from None
            if response is None:
                raise PoolError(ErrorCode.UNIT_CALL, message="setup ended without a reply", retry_after=1)
            if response.code == 0:
                return response
            # Task limit: free an idle pool task of the same unit and try once more.
            if response.code == ErrorCode.TASK_FULL and attempt == 0 and await self._evict_idle(served.unit, served):
                continue
            raise self._unit_error(response.code, response.message, retry_after=5)
        raise AssertionError("unreachable")

    async def _setup_reply(self, request: Request, served: Served) -> Response | None:
        """The reply to a setup; the progress messages before it (loading, converting) go to served.progress."""
        async with contextlib.aclosing(self.client.stream(request)) as messages:
            async for response in messages:
                if response.object.endswith(".setup.progress") and isinstance(response.data, dict):
                    served.progress = {"stage": str(response.data.get("stage", "loading")),
                                       "percent": int(response.data.get("percent", 0))}
                    continue
                return response
        return None

    async def _make_room(self, served: Served, manifest: dict) -> None:
        """Unload idle pool tasks (least recently used first) while the model does not fit in memory."""
        need_kib = self.meta(manifest)["size"] // 1024
        while True:
            try:
                info = (await self.client.call("sys", "cmminfo", timeout=5.0)).data
                remain = int(info.get("remain", 0))
            except (UnitError, asyncio.TimeoutError, AttributeError, TypeError, ValueError):
                return  # no memory figures: let the unit decide (-8)
            if remain >= need_kib:
                return
            if not await self._evict_idle(None, served):
                raise PoolError(ErrorCode.RESOURCE_ALLOCATION,
                                message=f"Unit Resource Allocation Failed: {manifest['mode']} needs "
                                        f"{need_kib} KiB, {remain} KiB available", retry_after=30)

    async def _evict_idle(self, unit: str | None, keep: Served) -> bool:
        idle = [s for s in self.served.values() if s is not keep and s.state == "loaded" and not s.inflight
                and not s.preload and (unit is None or s.unit == unit)]
        if not idle:
            return False
        victim = min(idle, key=lambda s: s.last_used)
        log.info("unloading idle %s to make room for %s", victim.mode, keep.mode)
        await self.unload(victim.mode, victim.unit)
        return True

    async def unload(self, mode: str, unit: str = "llm") -> bool:
        served = self.served.get((unit, mode))
        if served is None:
            return False
        if served.state == "loading" and served.ready is not None:
            try:
                await asyncio.shield(served.ready)
            except UnitError:
                return False
        served.state = "unloading"
        served.ready = asyncio.get_running_loop().create_future()
        try:
            await self.client.call(served.work_id, "exit", timeout=float(self.settings["timeouts.control_s"]))
        except (UnitError, asyncio.TimeoutError) as exc:
            log.warning("exit of %s: %s", served.work_id, exc)
        finally:
            if self.served.get((unit, mode)) is served:
                self.served.pop((unit, mode))
            served.ready.set_result(None)
        return True

    async def delete_model(self, manifest: dict) -> None:
        """Remove an installed model with sys.rmmode; ModelInUse while a task uses it."""
        names = {manifest["mode"], *manifest.get("aliases", [])}
        users = [t["work_id"] for t in await self.tasks() if t.get("model") in names]
        if users:
            raise ModelInUse(users[0])
        response = await self.client.request(Request(f"{self.name}-rmmode", "sys", "rmmode", "None",
                                                      manifest["mode"]))
        if response is None:
            raise PoolError(ErrorCode.UNIT_CALL, message="sys.rmmode ended without a reply", retry_after=1)
        if response.code in (ErrorCode.ACTION_DISABLED, ErrorCode.UNAUTHORIZED):
            raise self._unit_error(response.code, f"sys.rmmode is disabled: {response.message}")
        if response.code != 0:
            raise self._unit_error(response.code, response.message)

    def retry_after(self, served: Served) -> float:
        """(queue length + 1) x recent mean request time, clamped to 1..60 s (§1.5)."""
        mean = sum(served.durations) / len(served.durations) if served.durations else 2.0
        return max(1.0, min(60.0, (served.inflight + 1) * mean))

    @staticmethod
    def _unit_error(code: int, message: str, retry_after: float | None = None) -> PoolError:
        """The unit's error answer as raised by the pool (codes outside the table become -38)."""
        try:
            known = ErrorCode(code)
        except ValueError:
            return PoolError(ErrorCode.OPERATION_FAILED, message=message or f"unit error {code}",
                             retry_after=retry_after)
        return PoolError(known, message=message or None, retry_after=retry_after)

    # requests -----------------------------------------------------------------------------------
    async def stream(self, served: Served, data: Any, request_id: str,
                     object: str = "llm.chat_completion", whole: bool = False) -> AsyncIterator[Any]:
        """The unit's outputs for one inference (their data; whole Responses with `whole`). Raises PoolError
        for an error envelope. Closing the iterator before the end cancels the request on the unit (pause
        with its request_id)."""
        if served.work_id == BALANCED:
            data = {"model": served.mode, "input": data, "setup": served.setup}
        request = Request(request_id, served.work_id, "inference", object, data)
        served.inflight += 1
        self.running[request_id] = served
        started = time.monotonic()
        finished = False
        try:
            async for response in self.client.stream(request, timeout=None):
                if response.code != 0:
                    finished = True
                    if response.code in (ErrorCode.INFERENCE_PUSH, ErrorCode.UNIT_NOT_EXIST):
                        # The task is gone (unit restarted): forget it so the next request reloads.
                        self.served.pop((served.unit, served.mode), None)
                        raise PoolError(ErrorCode.UNIT_CALL, message=f"{served.work_id} is gone; retry",
                                        retry_after=1)
                    raise self._unit_error(response.code, response.message, retry_after=self.retry_after(served))
                if isinstance(response.data, dict) and response.data.get("finish"):
                    finished = True  # before the yield: the consumer may stop iterating at this chunk
                yield response if whole else response.data
            finished = True
        finally:
            served.inflight -= 1
            served.last_used = time.monotonic()
            self.running.pop(request_id, None)
            if finished:
                served.durations.append(time.monotonic() - started)
            else:
                log.info("%s: client gone, cancelling", request_id)
                self.spawn(self._pause(served, request_id))
            if served.keep_alive == 0 and not served.inflight and not served.preload:
                self.spawn(self.unload(served.mode, served.unit))

    async def call(self, served: Served, object: str, data: Any, request_id: str) -> list:
        """A request answered by messages without a stream (score, embed, asr, tts): all their data."""
        out = []
        async for item in self.stream(served, data, request_id, object):
            out.append(item)
        return out

    async def _pause(self, served: Served, request_id: str) -> None:
        try:
            await self.client.call(served.work_id, "pause", request_id, timeout=5.0)  # cancels this request only
        except (UnitError, asyncio.TimeoutError) as exc:
            log.warning("pause %s on %s: %s", request_id, served.work_id, exc)

    async def cancel(self, request_id: str) -> bool:
        served = self.running.get(request_id)
        if served is None:
            return False
        await self._pause(served, request_id)
        return True
