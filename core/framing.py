"""StackFlow framing on a byte stream (spec §13): string-aware braces and `{"RAW":N}` binary frames.

Pure and synchronous: feed bytes, get events. No I/O, so it can be fuzzed byte by byte.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Callable

from core.errors import ErrorCode

MIB = 1024 * 1024
_OPEN, _CLOSE, _QUOTE, _BACKSLASH, _NEWLINE = ord("{"), ord("}"), ord('"'), ord("\\"), ord("\n")
_IN_STRING = re.compile(rb'["\\\n]')
_STRUCTURAL = re.compile(rb'[{}"]')


@dataclass
class Frame:
    """A complete JSON frame; `raw` holds the payload of a {"RAW":N} frame."""
    data: bytes
    raw: bytes | None = None


@dataclass
class FramingError:
    """Something the connection must be told about; request_id is "0" unless a header said otherwise."""
    code: ErrorCode
    detail: str = ""
    request_id: str = "0"


class Framer:
    def __init__(self, max_frame_bytes: int = 4 * MIB, max_raw_bytes: int = 4 * MIB,
                 idle_reset_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.max_frame_bytes = max_frame_bytes
        self.max_raw_bytes = max_raw_bytes
        self.idle_reset_s = idle_reset_s
        self.clock = clock
        self._buf = bytearray()
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._oversize = False  # skipping the rest of a too-large frame while still counting braces
        self._raw_needed = 0  # payload bytes still to collect for a RAW header
        self._raw_header: bytes | None = None
        self._raw_skip = 0  # payload bytes of a refused RAW frame still to discard
        self._raw_buf = bytearray()
        self._last_byte_at = clock()

    @property
    def pending(self) -> bool:
        return self._depth > 0 or self._raw_needed > 0 or self._raw_skip > 0

    def check_idle(self) -> list[FramingError]:
        """Drop an incomplete frame that received nothing for idle_reset_s (spec §13.1 rule 6)."""
        if self._depth > 0 and self.clock() - self._last_byte_at >= self.idle_reset_s:
            self._reset_frame()
            return [FramingError(ErrorCode.JSON_FORMAT, "incomplete frame timed out")]
        return []

    def _reset_frame(self) -> None:
        self._buf.clear()
        self._depth = 0
        self._in_string = self._escaped = self._oversize = False

    def feed(self, chunk: bytes) -> list[Frame | FramingError]:
        events: list[Frame | FramingError] = []
        if chunk:
            self._last_byte_at = self.clock()
        stray_close_reported = False
        i, n = 0, len(chunk)
        while i < n:
            if self._raw_skip:
                take = min(self._raw_skip, n - i)
                self._raw_skip -= take
                i += take
                continue
            if self._raw_needed:
                take = min(self._raw_needed, n - i)
                self._raw_buf += chunk[i:i + take]
                self._raw_needed -= take
                i += take
                if not self._raw_needed:
                    events.append(Frame(self._raw_header or b"{}", bytes(self._raw_buf)))
                    self._raw_buf.clear()
                    self._raw_header = None
                continue
            if self._depth == 0:
                # Outside a frame: skip to the next '{' quickly, noting a stray '}'.
                start = chunk.find(b"{", i)
                stray = chunk.find(b"}", i, n if start < 0 else start)
                if stray >= 0 and not stray_close_reported:
                    events.append(FramingError(ErrorCode.REACE_RESET))
                    stray_close_reported = True
                if start < 0:
                    return events
                i = start
                self._depth = 1
                self._buf = bytearray(b"{")
                i += 1
                continue
            # Inside a frame: jump between the bytes that matter instead of stepping byte by byte.
            j = i
            while j < n:
                if self._in_string:
                    if self._escaped:
                        self._escaped = False
                        j += 1
                        continue
                    m = _IN_STRING.search(chunk, j)
                    if m is None:
                        j = n
                        break
                    j = m.start()
                    b = chunk[j]
                    if b == _NEWLINE:
                        break
                    if b == _BACKSLASH:
                        self._escaped = True
                    else:
                        self._in_string = False
                    j += 1
                    continue
                m = _STRUCTURAL.search(chunk, j)
                if m is None:
                    j = n
                    break
                j = m.start()
                b = chunk[j]
                if b == _QUOTE:
                    self._in_string = True
                elif b == _OPEN:
                    self._depth += 1
                else:
                    self._depth -= 1
                    if self._depth == 0:
                        break
                j += 1
            if j < n and self._in_string and chunk[j] == _NEWLINE:
                # A raw newline inside a string is illegal JSON: a lost quote; drop and resync (rule 4).
                self._reset_frame()
                events.append(FramingError(ErrorCode.JSON_FORMAT, "newline inside a string"))
                i = j + 1
                continue
            end = j + 1 if j < n else n
            if not self._oversize:
                if len(self._buf) + (end - i) > self.max_frame_bytes:
                    self._oversize = True
                    self._buf.clear()
                    events.append(FramingError(ErrorCode.FRAME_TOO_LARGE,
                                               f"frame over {self.max_frame_bytes} bytes"))
                else:
                    self._buf += chunk[i:end]
            i = end
            if self._depth == 0:
                if self._oversize:
                    self._reset_frame()
                else:
                    data = bytes(self._buf)
                    self._reset_frame()
                    self._complete(data, events)
        return events

    def _complete(self, data: bytes, events: list) -> None:
        if b'"RAW"' in data[:64] or b'"BON"' in data[:64]:
            header = _binary_header(data)
            if header is not None:
                kind, size, obj = header
                request_id = obj.get("request_id") if isinstance(obj.get("request_id"), str) else "0"
                if kind == "BON":
                    self._raw_skip = size
                    events.append(FramingError(ErrorCode.JSON_FORMAT, "BSON frames are not supported", request_id))
                    return
                if size > self.max_raw_bytes:
                    self._raw_skip = size
                    events.append(FramingError(ErrorCode.FRAME_TOO_LARGE,
                                               f"raw payload of {size} bytes over {self.max_raw_bytes}", request_id))
                    return
                del obj["RAW"]
                if size == 0:
                    events.append(Frame(json.dumps(obj).encode(), b""))
                    return
                self._raw_header = json.dumps(obj).encode()
                self._raw_needed = size
                return
        events.append(Frame(data))


def _binary_header(data: bytes) -> tuple[str, int, dict] | None:
    """('RAW'|'BON', N, header) when the frame's first key is RAW or BON with a non-negative integer."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not obj:
        return None
    first = next(iter(obj))
    size = obj[first]
    if first in ("RAW", "BON") and isinstance(size, int) and not isinstance(size, bool) and size >= 0:
        return first, size, obj
    return None
