"""What every listener shares: body parsing, auth, health, waiting for the unit, the app factory."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Callable

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from firmware_bridge.http.errors import GatewayError
from firmware_bridge.http.gateway import Gateway, Served
from firmware_bridge.http.streaming import POLL_S, ClientGone, UnitStream, first

log = logging.getLogger(__name__)

Renderer = Callable[[GatewayError, str], Response]  # (error, request path)
OPEN_PATHS = {"/livez", "/health", "/healthz"}


async def read_json(request: Request, required: bool = True) -> dict[str, Any]:
    """The JSON object body (no Content-Type needed, as Ollama); 400 for a missing or invalid body."""
    limit = int(request.app.state.settings["http.max_body_bytes"])
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise GatewayError(413, f"request body larger than {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        if required:
            raise GatewayError(400, "missing request body")
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise GatewayError(400, f"invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "the request body must be a JSON object")
    return body


async def watch(request: Request, awaitable) -> Any:
    """Await while polling the client every second; if it left, cancel the wait and raise ClientGone.
    (Cancelling a Gateway.acquire() stops only the wait, the load goes on unless
    http.abort_load_on_disconnect; cancelling a Gateway.call() pauses the request on the unit.)"""
    task = asyncio.ensure_future(awaitable)
    while True:
        done, _ = await asyncio.wait({task}, timeout=POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise ClientGone()


async def open_llm(gw: Gateway, request: Request, manifest: dict, data: dict, request_id: str, *,
                   keepalive: bool = False, keep_alive: Any = "default", object: str = "llm.chat_completion",
                   notes: dict | None = None) -> tuple[Served, UnitStream, Any]:
    """Load the model if needed, send the inference and wait for its first output (or error).
    With http.truncate_history = "oldest", a conversation that does not fit (-35) loses its oldest
    non-system messages one at a time (never the last one); `notes["truncated"]` counts them."""
    served = await watch(request, gw.acquire(manifest, keep_alive=keep_alive))
    settings = gw.settings
    while True:
        unit_stream = UnitStream(gw.stream(served, data, request_id, object), gw.spawn)
        try:
            head = await first(unit_stream, request, float(settings["http.queue_timeout_s"]),
                               float(settings["http.sse_keepalive_s"]) if keepalive else None)
        except StopAsyncIteration:
            raise GatewayError(500, "the unit ended the request without output", code="model_error") from None
        except GatewayError as exc:
            messages = data.get("messages") or []
            droppable = [i for i, m in enumerate(messages[:-1]) if m.get("role") != "system"]
            if exc.unit_code != -35 or settings["http.truncate_history"] != "oldest" or not droppable:
                raise
            del messages[droppable[0]]
            if notes is not None:
                notes["truncated"] = notes.get("truncated", 0) + 1
            continue
        return served, unit_stream, head


async def call_unit(gw: Gateway, request: Request, manifest: dict, object: str, data: Any, request_id: str,
                    keep_alive: Any = "default") -> list:
    served = await watch(request, gw.acquire(manifest, keep_alive=keep_alive))
    return await watch(request, gw.call(served, object, data, request_id))


def number(body: dict, key: str, low: float | None = None, high: float | None = None,
           integer: bool = False, param: str | None = None) -> Any:
    """A numeric field or None; wrong type or range is a 400 naming the parameter."""
    value = body.get(key)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and integer:
        ok = float(value).is_integer()
        value = int(value) if ok else value
    if not ok:
        raise GatewayError(400, f"{key}: expected {'an integer' if integer else 'a number'}, got {value!r}",
                           param=param or key)
    if (low is not None and value < low) or (high is not None and value > high):
        raise GatewayError(400, f"{key}: {value} is outside {low}..{high}", param=param or key)
    return value


def stop_list(value: Any, param: str = "stop", limit: int | None = 4) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value) and (limit is None or len(value) <= limit):
        return list(value)
    raise GatewayError(400, f"{param}: expected a string or a list of up to {limit} strings", param=param)


def capabilities(manifest: dict) -> set[str]:
    return {c.lower() for c in manifest.get("capabilities", [])}


def require_capability(manifest: dict, capability: str, param: str, what: str | None = None) -> None:
    if capability not in capabilities(manifest):
        raise GatewayError(400, f"{what or param} is not supported by {manifest['mode']}",
                           code="unsupported_parameter", param=param)


def usage_totals(usage: dict | None) -> dict[str, int]:
    usage = usage or {}
    prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(chunk: dict) -> str:
    """Unit finish reasons in OpenAI's vocabulary (a cancelled request reports `stop`)."""
    reason = chunk.get("finish_reason") or "stop"
    return "length" if reason == "length" else "stop"


# health (§1.9) ------------------------------------------------------------------------------------
async def health(request: Request) -> JSONResponse:
    gw: Gateway = request.app.state.gateway
    if not await gw.ping():
        return JSONResponse({"status": "unavailable"}, status_code=503)
    models: dict[str, str] = {}
    status = "ok"
    for name in gw.settings["http.preload"]:
        if name in gw.preload_errors:
            models[name] = f"failed: {gw.preload_errors[name]}"
            status = "error"
            continue
        states = [s.state for s in gw.served.values() if s.mode == name]
        state = states[0] if states else "loading"
        models[name] = state
        if state != "loaded" and status == "ok":
            status = "loading"
    for served in gw.served.values():
        models.setdefault(served.mode, served.state)
    body = {"status": status, "models": models, "dbc": gw.dbc_state}
    return JSONResponse(body, status_code=200 if status == "ok" else 503)


async def livez(request: Request) -> JSONResponse:
    return JSONResponse({"status": "alive"})


# auth (§1.11) and the app -------------------------------------------------------------------------
def presented_key(headers) -> str | None:
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get("x-api-key")


class Guard:
    """ASGI middleware: API key, body size (by Content-Length), per-client in-flight limits, 499 logging."""

    def __init__(self, app, api: str, render: Renderer, gateway: Gateway):
        self.app = app
        self.api = api
        self.render = render
        self.gateway = gateway

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = self.gateway.settings
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        key = presented_key(headers)
        if self.api == "ai00" and path.startswith("/admin/"):
            key = headers.get("x-api-key")  # Authorization carries Ai00's admin JWT there
        error = None
        if settings["http.api_key"] and path not in OPEN_PATHS and key != settings["http.api_key"]:
            error = GatewayError(401, "Incorrect API key provided", code="invalid_api_key")
        length = headers.get("content-length", "")
        if error is None and length.isdigit() and int(length) > int(settings["http.max_body_bytes"]):
            error = GatewayError(413, f"request body larger than {settings['http.max_body_bytes']} bytes")
        tickets: list[str] = []
        if error is None and scope.get("method") == "POST":
            try:
                client = scope.get("client") or (None, None)
                tickets = self.gateway.admit(key, client[0])
            except GatewayError as exc:
                error = exc
        if error is not None:
            return await self.render(error, path)(scope, receive, send)
        try:
            await self.app(scope, receive, send)
        finally:
            self.gateway.release(tickets)


def make_app(api: str, gateway: Gateway, routes: Callable[[FastAPI], None], render: Renderer) -> FastAPI:
    app = FastAPI(title=f"unitbus {api} gateway", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gateway
    app.state.settings = gateway.settings
    app.state.started = time.time()

    async def on_gateway_error(request: Request, exc: GatewayError) -> Response:
        if exc.status >= 500:
            log.warning("%s %s: %d %s", request.method, request.url.path, exc.status, exc.message)
        return render(exc, request.url.path)

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = "model_not_found" if exc.status_code == 404 else None
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return render(GatewayError(exc.status_code, message, code=code), request.url.path)

    async def on_client_gone(request: Request, exc: ClientGone) -> Response:
        log.info("%s %s: 499 client closed request", request.method, request.url.path)
        return Response(status_code=499)

    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(ClientGone, on_client_gone)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_api_route("/livez", livez, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/healthz", health, methods=["GET"])
    routes(app)
    app.add_middleware(Guard, api=api, render=render, gateway=gateway)
    return app
