"""What every listener shares: body parsing, auth, health, waiting for the unit, the app factory."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import time
from http import HTTPStatus
from typing import Any, Callable

from fastapi import APIRouter, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from core.errors import ErrorCode
from core.sampling import DOMAINS, Domain
from firmware_bridge.http.errors import GatewayError
from firmware_bridge.http.gateway import Gateway, Served
from firmware_bridge.http.streaming import POLL_S, ClientGone, UnitStream, first

log = logging.getLogger(__name__)

Renderer = Callable[[GatewayError, str], Response]  # (error, request path)
OPEN_PATHS = {"/livez", "/health", "/healthz", "/openapi.json", "/docs"}


def gateway(request: Request) -> Gateway:
    """The listener's Gateway (one per process, shared by every listener)."""
    return request.app.state.gateway


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
            if exc.unit_code != ErrorCode.CONTEXT_EXCEEDED or settings["http.truncate_history"] != "oldest" or not droppable:
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
    """A numeric field or None; a wrong type, a non-finite value or one out of range is a 400 naming it.
    Keys of core/sampling.py keep at least their domain there, whatever an API's own range says."""
    value = body.get(key)
    if value is None:
        return None
    try:
        value = Domain(low, high, integer=integer).check(key, value)
        if key in DOMAINS:
            value = DOMAINS[key].check(key, value)
    except ValueError as exc:
        raise GatewayError(400, str(exc), param=param or key) from None
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
    return reason if reason in ("length", "tool_calls") else "stop"


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


class Health(BaseModel):
    status: str
    models: dict[str, str] = {}
    dbc: str = ""


HEALTH = APIRouter(tags=["health"])
HEALTH.add_api_route("/livez", livez, methods=["GET"], response_model=Health)
for _path in ("/health", "/healthz"):
    HEALTH.add_api_route(_path, health, methods=["GET"], response_model=Health,
                         responses={503: {"model": Health, "description": "sys or a preloaded model is not ready"}})


# auth (§1.11) and the app -------------------------------------------------------------------------
def presented_key(headers) -> str | None:
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get("x-api-key")


MAX_JSON_DEPTH = 64  # deeper than any request body of these APIs; the bus encoding refuses deeper still
BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
BIG_BODY = 256 * 1024  # checked in a worker thread from this size on, so the loop keeps serving
ERROR_STATUSES = (400, 401, 403, 404, 408, 409, 413, 429, 500, 501, 503, 504)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large for a number")
    return value


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion (a scalar is 0)."""
    depth, level = 0, [(value, 1)]
    while level:
        item, d = level.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        depth = max(depth, d)
        level.extend((child, d + 1) for child in children)
    return depth


def check_json(raw: bytes) -> None:
    """A JSON body every route can take, or GatewayError(400): strict UTF-8, standard JSON with finite numbers, nesting
    up to MAX_JSON_DEPTH, no lone UTF-16 surrogates (the bus encodes strings as UTF-8)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GatewayError(400, f"invalid JSON body: not UTF-8 at byte {exc.start}") from None
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise GatewayError(400, f"invalid JSON body: nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        raise GatewayError(400, f"invalid JSON body: {exc}") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise GatewayError(400, f"invalid JSON body: nested deeper than {MAX_JSON_DEPTH} levels")
    if not SURROGATE_ESCAPE.search(raw):
        return  # strict UTF-8 holds no surrogates: only a \\uD800-\\uDFFF escape can make one
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise GatewayError(400, "invalid JSON body: a string holds a lone UTF-16 surrogate (\\ud800-\\udfff)") \
            from None


async def read_body(receive, limit: int, timeout_s: float) -> bytes | None:
    """The whole request body (None if the client left first); GatewayError(413) past `limit` bytes and
    408 if it has not all arrived `timeout_s` after the headers (a body sent a byte at a time would
    otherwise hold its connection and admission ticket for ever)."""
    chunks, size = [], 0
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            message = await asyncio.wait_for(receive(), max(remaining, 0))
        except TimeoutError:
            raise GatewayError(408, f"request body not received within {timeout_s:g} s "
                                    f"({size} bytes arrived)") from None
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise GatewayError(413, f"request body larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def same_key(presented: Any, expected: str) -> bool:
    """Constant-time comparison: the time taken tells nothing about how much of a guess was right."""
    return isinstance(presented, str) and hmac.compare_digest(presented.encode(), expected.encode())


class Guard:
    """ASGI middleware: API key, body size and JSON checks (one place for every route), per-client in-flight
    limits. A JSON body is checked once here and handed on as application/json whatever Content-Type the
    client sent (Ollama's clients and `curl -d` send none or a form type)."""

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
        limit = int(settings["http.max_body_bytes"])
        error = None
        if settings["http.api_key"] and path not in OPEN_PATHS and not same_key(key, settings["http.api_key"]):
            error = GatewayError(401, "Incorrect API key provided", code="invalid_api_key")
        length = headers.get("content-length", "")
        if error is None and length.isdigit() and int(length) > limit:
            error = GatewayError(413, f"request body larger than {limit} bytes")
        tickets: list[str] = []
        if error is None and scope.get("method") == "POST":
            try:
                client = scope.get("client") or (None, None)
                tickets = self.gateway.admit(key, client[0])
            except GatewayError as exc:
                error = exc
        try:
            if error is None and scope.get("method") in BODY_METHODS:
                try:
                    scope, receive = await self._checked_body(scope, receive, headers, limit,
                                                              float(settings["http.body_timeout_s"]))
                except GatewayError as exc:
                    error = exc
                if receive is None:
                    return  # the client left while sending its body: nobody to answer
            if error is not None:
                return await self.render(error, path)(scope, receive, send)
            await self.app(scope, receive, send)
        finally:
            self.gateway.release(tickets)

    @staticmethod
    async def _checked_body(scope, receive, headers: dict[str, str], limit: int, timeout_s: float):
        body = await read_body(receive, limit, timeout_s)
        if body is None:
            return scope, None
        if body.strip() and not headers.get("content-type", "").startswith("multipart/"):
            if len(body) >= BIG_BODY:
                await asyncio.to_thread(check_json, body)
            else:
                check_json(body)
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
                     + [(b"content-type", b"application/json")]}
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the client's disconnect, which streaming responses watch for

        return scope, replay


UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _is_union_tag(part: Any) -> bool:
    """pydantic names the member of a union it tried inside `loc` ("str", "list[str]", "Part"): not a field."""
    return isinstance(part, str) and (part in UNION_TAGS or "[" in part or part[:1].isupper())


def validation_error(exc: RequestValidationError) -> GatewayError:
    """FastAPI's request validation failure as one 400 naming the first field at fault (`messages[0].role`)."""
    errors = exc.errors()
    first_error = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = list(first_error.get("loc", ()))
    if loc[:1] == ["body"]:
        loc = loc[1:]
    param = ""
    for part in loc:
        if _is_union_tag(part):
            continue
        param += f"[{part}]" if isinstance(part, int) else f".{part}" if param else str(part)
    message = f"{param}: {first_error['msg']}" if param else str(first_error["msg"])
    if first_error.get("type") == "missing" and not param:
        message = "missing request body"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    return GatewayError(400, message, param=param or None)


def error_responses(model: Any) -> dict[int | str, dict[str, Any]]:
    """The documented failures of a route, each in its API's error shape."""
    return {status: {"model": model, "description": HTTPStatus(status).phrase} for status in ERROR_STATUSES}


def openapi_without_422(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """The app's OpenAPI document without FastAPI's 422 entries: validation failures are answered 400
    in the API's own error shape (documented per route by error_responses)."""
    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                 description=app.description)
            for item in schema.get("paths", {}).values():
                for operation in item.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema
    return build


def make_app(api: str, gateway: Gateway, routers: list[APIRouter], render: Renderer,
             init: Callable[[FastAPI], None] | None = None) -> FastAPI:
    app = FastAPI(title=f"unitbus {api} gateway", docs_url="/docs", redoc_url=None,
                  openapi_url="/openapi.json")
    app.state.gateway = gateway
    app.state.settings = gateway.settings
    app.state.started = time.time()
    if init is not None:
        init(app)

    async def on_gateway_error(request: Request, exc: GatewayError) -> Response:
        if exc.status >= 500:
            log.warning("%s %s: %d %s", request.method, request.url.path, exc.status, exc.message)
        return render(exc, request.url.path)

    async def on_invalid(request: Request, exc: RequestValidationError) -> Response:
        return render(validation_error(exc), request.url.path)

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = "model_not_found" if exc.status_code == 404 else None
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return render(GatewayError(exc.status_code, message, code=code), request.url.path)

    async def on_client_gone(request: Request, exc: ClientGone) -> Response:
        log.info("%s %s: 499 client closed request", request.method, request.url.path)
        return Response(status_code=499)

    async def on_bug(request: Request, exc: Exception) -> Response:
        # The last resort: a fault of ours is still answered in the API's shape (and logged with its trace).
        log.error("%s %s: unhandled %s", request.method, request.url.path, type(exc).__name__, exc_info=exc)
        return render(GatewayError(500, f"internal error ({type(exc).__name__})", code="internal_error"),
                      request.url.path)

    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(ClientGone, on_client_gone)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_bug)
    app.include_router(HEALTH)
    for router in routers:
        app.include_router(router)
    app.openapi = openapi_without_422(app)
    app.add_middleware(Guard, api=api, render=render, gateway=gateway)
    return app
