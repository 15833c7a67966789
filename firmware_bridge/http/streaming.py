"""SSE and NDJSON framing, and waiting for a unit's first output while watching the HTTP client (§1.6, §1.8).

The status line is decided by the first unit message: a request that fails before producing anything gets
a real status code. While waiting (queue, load, prefill) the client is polled every second; if it is gone
the request is cancelled on the unit. Once the body streams, Starlette cancels the body iterator when the
client disconnects, and closing the unit iterator sends the `pause`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import StreamingResponse

from firmware_bridge.http.errors import GatewayError

log = logging.getLogger(__name__)

POLL_S = 1.0
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}


class ClientGone(Exception):
    """The HTTP client disconnected before the response started (logged as 499)."""


class UnitStream:
    """An async iterator of unit outputs that can be waited on with a timeout without losing an item."""

    def __init__(self, source: AsyncIterator[Any], spawn: Callable[[Awaitable], Any]):
        self.source = source
        self.spawn = spawn
        self.pending: asyncio.Future | None = None

    async def next(self, timeout: float | None = None) -> Any:
        """The next item; StopAsyncIteration at the end; asyncio.TimeoutError keeps the wait pending."""
        if self.pending is None:
            self.pending = asyncio.ensure_future(self.source.__anext__())
        done, _ = await asyncio.wait({self.pending}, timeout=timeout)
        if not done:
            raise asyncio.TimeoutError
        future, self.pending = self.pending, None
        return future.result()

    def close(self) -> None:
        """Synchronous on purpose: it runs in `finally` blocks of cancelled tasks, where awaits fail."""
        if self.pending is not None and not self.pending.done():
            self.pending.cancel()  # the source's finally sends the pause
        elif self.pending is not None and not self.pending.cancelled():
            self.pending.exception()
        self.pending = None
        self.spawn(self.source.aclose())


async def first(stream: UnitStream, request: Request, deadline_s: float, keepalive_s: float | None = None) -> Any:
    """Wait for the first unit output, polling the client. Returns `KEEPALIVE_DUE` when an SSE response
    should start with keep-alive comments instead of waiting longer before the headers."""
    started = time.monotonic()
    while True:
        try:
            return await stream.next(POLL_S)
        except asyncio.TimeoutError:
            pass
        if await request.is_disconnected():
            stream.close()
            raise ClientGone()
        waited = time.monotonic() - started
        if waited >= deadline_s:
            stream.close()
            raise GatewayError(503, f"request did not start within {deadline_s:.0f} s", code="server_busy",
                               retry_after=5)
        if keepalive_s is not None and waited >= keepalive_s:
            return KEEPALIVE_DUE


KEEPALIVE_DUE = object()


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def ndjson(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def sse_response(body: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream; charset=utf-8",
                             headers={**STREAM_HEADERS, **(headers or {})})


def ndjson_response(body: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> StreamingResponse:
    return StreamingResponse(body, media_type="application/x-ndjson", headers={**STREAM_HEADERS, **(headers or {})})


async def pump(stream: UnitStream, head: Any, keepalive_s: float | None) -> AsyncIterator[Any]:
    """Items of the unit stream starting with `head`; None items stand for due keep-alive comments."""
    item = head
    while True:
        if item is KEEPALIVE_DUE:
            yield None
        else:
            yield item
        try:
            item = await stream.next(keepalive_s)
        except asyncio.TimeoutError:
            item = KEEPALIVE_DUE
        except StopAsyncIteration:
            return


async def openai_sse(unit_stream: UnitStream, head: Any, keepalive_s: float | None,
                     render: Callable[[dict], list[bytes]]) -> AsyncIterator[bytes]:
    """An OpenAI-style SSE body: `render(chunk)` gives the events of each unit chunk up to the finish
    chunk, then `data: [DONE]`. A unit error after the headers becomes an error event; the unit stream
    is closed however the body ends (a client that disconnects cancels it here)."""
    try:
        async for chunk in pump(unit_stream, head, keepalive_s):
            if chunk is None:
                yield b": keep-alive\n\n"
                continue
            for event in render(chunk):
                yield event
            if chunk.get("finish"):
                break
        yield b"data: [DONE]\n\n"
    except GatewayError as exc:
        yield sse({"error": exc.openai_error()})
    finally:
        unit_stream.close()


async def collect(unit_stream: UnitStream, head: Any, request: Request) -> tuple[str, dict]:
    """A whole (non-streamed) answer: the joined text and the final chunk (usage, finish_reason).
    The client is checked once a second while the unit generates: nobody reads an answer whose client left."""
    parts, last = [], {}
    checked = time.monotonic()
    chunk = head
    try:
        while True:
            if chunk is not None:
                parts.append(chunk.get("delta") or "")
                if chunk.get("finish"):
                    last = chunk
                    break
            try:
                chunk = await unit_stream.next(POLL_S)
            except asyncio.TimeoutError:
                chunk = None
            except StopAsyncIteration:
                break
            if time.monotonic() - checked >= POLL_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    raise ClientGone()
    finally:
        unit_stream.close()
    return "".join(parts), last
