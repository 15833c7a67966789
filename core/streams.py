"""Reassembly of streamed input (spec §10.1, §10.5): pure, bounded, one buffer per (connection, target).

Clients send a stream as chunks `{"delta", "index", "finish"}`, often with a fresh request_id per chunk
(the ModuleLLM OpenAI plugin, StackFlow's own tools), so buffers are keyed by the connection and the
target (a task's work_id, or a sys action), never by request_id: `index:0` starts a stream, the next
indexes continue it, and the chunk with `finish:true` completes it. No I/O and no clock of its own, so
units, sys and the property tests share exactly one set of rules.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from core.errors import ErrorCode, UnitError

Conn = tuple[Any, Any]  # (bus client identity, connection number on that client)


@dataclass
class _Buffer:
    parts: list[str] = field(default_factory=list)
    size: int = 0
    touched: float = 0.0


class StreamAssembler:
    """Joins chunks in index order; a finished stream is returned once and forgotten.

    Bounded three ways: each buffer by `max_bytes` (-34 beyond), each buffer's life by `idle_s`
    without a new chunk (dropped silently: its client is presumed gone), and every buffer of a
    connection or client by `drop_client` when it leaves.
    """

    def __init__(self, max_bytes: int, idle_s: float, clock: Callable[[], float] = time.monotonic):
        self.max_bytes = max_bytes
        self.idle_s = idle_s
        self.clock = clock
        self._buffers: dict[tuple[Conn, Hashable], _Buffer] = {}

    def __len__(self) -> int:
        return len(self._buffers)

    @property
    def held_bytes(self) -> int:
        return sum(b.size for b in self._buffers.values())

    def feed(self, conn: Conn, target: Hashable, chunk: Any) -> str | None:
        """The joined stream when `chunk` completes it, None while it continues; UnitError on bad input."""
        now = self.clock()
        self.expire(now)
        delta, index, finish = parse_chunk(chunk)
        key = (conn, target)
        buffer = self._buffers.get(key)
        if index == 0 or buffer is None:
            self._buffers.pop(key, None)
            if index != 0 and not finish:
                raise UnitError(ErrorCode.STREAM_INDEX, f"a stream starts at index 0, not {index}")
            buffer = _Buffer()
            if not finish:
                self._buffers[key] = buffer
            # else: a whole stream in one chunk; a lone final chunk is accepted whatever its index
        elif index != len(buffer.parts):
            del self._buffers[key]
            raise UnitError(ErrorCode.STREAM_INDEX, f"index {index} where {len(buffer.parts)} was due")
        buffer.size += len(delta.encode("utf-8"))
        if buffer.size > self.max_bytes:
            self._buffers.pop(key, None)
            raise UnitError(ErrorCode.FRAME_TOO_LARGE, f"stream over framing.max_stream_bytes ({self.max_bytes})")
        buffer.parts.append(delta)
        buffer.touched = now
        if not finish:
            return None
        self._buffers.pop(key, None)
        return "".join(buffer.parts)

    def expire(self, now: float | None = None) -> None:
        """Forget streams without a chunk for idle_s."""
        limit = (self.clock() if now is None else now) - self.idle_s
        for key in [k for k, b in self._buffers.items() if b.touched < limit]:
            del self._buffers[key]

    def drop_client(self, client: Any, conn: Any = None) -> None:
        """A client (every connection of it when conn is None) went away: free its buffers."""
        for key in [k for k in self._buffers if k[0][0] == client and (conn is None or k[0][1] == conn)]:
            del self._buffers[key]

    def drop_target(self, target: Hashable) -> None:
        """A task went away: free the streams sent to it."""
        for key in [k for k in self._buffers if k[1] == target]:
            del self._buffers[key]


def parse_chunk(chunk: Any) -> tuple[str, int, bool]:
    """(delta, index, finish) of a stream chunk. A missing finish counts as true (spec §10.5)."""
    if not isinstance(chunk, dict) or not isinstance(chunk.get("delta"), str):
        raise UnitError(ErrorCode.JSON_FORMAT, 'a stream chunk is {"delta":<string>,"index":<int>,"finish":<bool>}')
    index = chunk.get("index", 0)
    if isinstance(index, float) and index.is_integer():
        index = int(index)  # the Arduino library sends some integers as floats
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise UnitError(ErrorCode.STREAM_INDEX, f"index must be a non-negative integer, not {index!r}")
    return chunk["delta"], index, chunk.get("finish", True) is not False
