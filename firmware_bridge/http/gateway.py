"""The HTTP face of the task pool: the pool's UnitErrors as HTTP errors, and per-client admission (§1.5, §1.7).

Every API module goes through `Gateway`; the model catalogue, task loading and sharing, keep-alive,
queueing and cancellation are `firmware_bridge.pool.TaskPool`'s.
"""
from __future__ import annotations

import collections
import contextlib
from typing import Any, AsyncIterator

from core.client import BusClient
from core.errors import ErrorCode, UnitError
from core.settings import Settings
from firmware_bridge.http.errors import GatewayError
from firmware_bridge.pool import ModelInUse, ModelNotFound, Served, TaskPool, parse_duration

__all__ = ["Gateway", "Served", "http_error", "parse_duration"]


def http_error(exc: UnitError) -> GatewayError:
    """A pool failure as the HTTP error its StackFlow code maps to (§1.7)."""
    param = getattr(exc, "param", None)
    if isinstance(exc, ModelNotFound):
        return GatewayError(404, exc.message, code="model_not_found", param=param)
    if isinstance(exc, ModelInUse):
        return GatewayError(409, exc.message)
    if exc.code in (ErrorCode.ACTION_DISABLED, ErrorCode.UNAUTHORIZED):
        return GatewayError(403, exc.message)
    return GatewayError.from_unit(int(exc.code), exc.message, retry_after=getattr(exc, "retry_after", None),
                                  param=param)


@contextlib.contextmanager
def http_errors():
    try:
        yield
    except UnitError as exc:
        raise http_error(exc) from None


class Gateway:
    def __init__(self, settings: Settings, client: BusClient | None = None):
        self.settings = settings
        self.pool = TaskPool(settings, client, name="http", keep_alive=settings["http.keep_alive"],
                             max_queue=int(settings["http.max_queue"]), preload=settings["http.preload"],
                             abort_load_on_disconnect=bool(settings["http.abort_load_on_disconnect"]))
        self.inflight_keys: collections.Counter = collections.Counter()
        self.dbc_state = "disabled"

    @property
    def served(self) -> dict[tuple[str, str], Served]:
        return self.pool.served

    @property
    def preload_errors(self) -> dict[str, str]:
        return self.pool.preload_errors

    # lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> "Gateway":
        await self.pool.start()
        return self

    async def close(self) -> None:
        await self.pool.close()

    def spawn(self, coro):
        return self.pool.spawn(coro)

    # catalogue ----------------------------------------------------------------------------------
    async def models(self, types: tuple[str, ...] = ("llm",)) -> list[dict]:
        with http_errors():
            return await self.pool.models(types)

    async def find(self, name: Any, types: tuple[str, ...] = ("llm",)) -> dict:
        """The manifest for a model name or alias; 404 before anything loads."""
        with http_errors():
            return await self.pool.find(name, types)

    def meta(self, manifest: dict) -> dict[str, Any]:
        return self.pool.meta(manifest)

    async def tasks(self) -> list[dict]:
        return await self.pool.tasks()

    def state(self, mode: str, unit: str = "llm") -> str:
        return self.pool.state(mode, unit)

    async def ping(self) -> bool:
        return await self.pool.ping()

    # tasks --------------------------------------------------------------------------------------
    async def acquire(self, manifest: dict, *, keep_alive: Any = "default", preload: bool = False,
                      setup: dict[str, Any] | None = None) -> Served:
        with http_errors():
            return await self.pool.acquire(manifest, keep_alive=keep_alive, preload=preload, setup=setup)

    async def unload(self, mode: str, unit: str = "llm") -> bool:
        return await self.pool.unload(mode, unit)

    async def delete_model(self, manifest: dict, in_use: str = "model in use by {}") -> None:
        """Remove an installed model with sys.rmmode; 409 while a task uses it, 403 when rmmode is off."""
        try:
            await self.pool.delete_model(manifest)
        except ModelInUse as exc:
            raise GatewayError(409, in_use.format(exc.work_id)) from None
        except UnitError as exc:
            raise http_error(exc) from None

    # requests -----------------------------------------------------------------------------------
    async def stream(self, served: Served, data: Any, request_id: str,
                     object: str = "llm.chat_completion") -> AsyncIterator[Any]:
        """The pool's stream with HTTP errors; closing it early cancels the request on the unit."""
        source = self.pool.stream(served, data, request_id, object)
        try:
            with http_errors():
                async for item in source:
                    yield item
        finally:
            await source.aclose()

    async def call(self, served: Served, object: str, data: Any, request_id: str) -> list:
        with http_errors():
            return await self.pool.call(served, object, data, request_id)

    async def cancel(self, request_id: str) -> bool:
        return await self.pool.cancel(request_id)

    # per-client limits ---------------------------------------------------------------------------
    def admit(self, api_key: str | None, ip: str | None) -> list[str]:
        """Count an in-flight request against http.max_inflight_per_key/ip; 429 beyond."""
        keys = []
        for kind, who, limit in (("key", api_key, self.settings["http.max_inflight_per_key"]),
                                 ("ip", ip, self.settings["http.max_inflight_per_ip"])):
            if limit and who:
                keys.append(f"{kind}:{who}")
        for key in keys:
            limit = self.settings[f"http.max_inflight_per_{key.split(':')[0]}"]
            if self.inflight_keys[key] >= limit:
                raise GatewayError(429, f"too many requests in flight ({limit} allowed)", retry_after=2)
        for key in keys:
            self.inflight_keys[key] += 1
        return keys

    def release(self, keys: list[str]) -> None:
        for key in keys:
            self.inflight_keys[key] -= 1
            if self.inflight_keys[key] <= 0:
                del self.inflight_keys[key]
