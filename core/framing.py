"""StackFlow framing on a byte stream (spec §13): string-aware braces and `{"RAW":N}` binary frames.

Pure and synchronous: feed bytes, get events. No I/O, so it can be fuzzed byte by byte.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

from core.envelope import is_request
from core.errors import ErrorCode

MIB = 1024 * 1024
# A frame that failed is searched for requests nested in it (§13.1 rule 7); each candidate costs a parse,
# so a hostile frame gets at most this many.
MAX_RESYNC_PARSES = 64
_OPEN, _CLOSE, _QUOTE, _BACKSLASH, _NEWLINE = ord("{"), ord("}"), ord('"'), ord("\\"), ord("\n")
_LBRACKET, _RBRACKET, _COLON, _COMMA = ord("["), ord("]"), ord(":"), ord(",")
_IN_STRING = re.compile(rb'["\\\n]')
# Inside a frame, outside strings: JSON whitespace, then a structural byte (1), a number or literal (2,
# loosely: the parser judges it later) or any other byte (3), which no JSON text has there.
_TOKEN = re.compile(rb'[ \t\r\n]*(?:([{}\[\]:,"])|([A-Za-z0-9+\-.]+)|(.))?', re.S)
_NESTED = re.compile(rb'[{}"\\]')
_BINARY_HEADER = re.compile(rb'\{[ \t\r\n]*"(?:RAW|BON)"[ \t\r\n]*:')
# What may come next in a frame, outside strings.
_KEY_OR_END, _KEY, _COLON_NEXT, _VALUE, _VALUE_OR_END, _AFTER_VALUE = range(6)


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
        self._stack = bytearray()  # the open objects and arrays of the current frame: b"{" or b"["
        self._expect = _KEY_OR_END
        self._in_string = False
        self._key = False  # the open string is an object key
        self._escaped = False
        self._scalar_open = False  # the last chunk ended inside a number or literal
        self._oversize = False  # skipping the rest of a too-large frame while still following its syntax
        self._skip_closes = 0  # '}' that close a dropped frame, not stray ones (rule 7)
        self._raw_needed = 0  # payload bytes still to collect for a RAW header
        self._raw_header: bytes | None = None
        self._raw_skip = 0  # payload bytes of a refused RAW frame still to discard
        self._raw_buf = bytearray()
        self._last_byte_at = clock()

    @property
    def pending(self) -> bool:
        return bool(self._stack) or self._raw_needed > 0 or self._raw_skip > 0

    def check_idle(self) -> list[Frame | FramingError]:
        """Drop an incomplete frame that received nothing for idle_reset_s (spec §13.1 rules 6 and 7)."""
        events: list[Frame | FramingError] = []
        if self._stack and self.clock() - self._last_byte_at >= self.idle_reset_s:
            self._abandon(events, "incomplete frame timed out")
        return events

    def _reset_frame(self) -> None:
        self._buf.clear()
        self._stack.clear()
        self._expect = _KEY_OR_END
        self._in_string = self._key = self._escaped = self._scalar_open = self._oversize = False

    def _abandon(self, events: list[Frame | FramingError], detail: str) -> None:
        """The current frame cannot be a request: say so, then answer the requests nested in it (rule 7)."""
        data = b"" if self._oversize else bytes(self._buf)
        self._reset_frame()
        events.append(FramingError(ErrorCode.JSON_FORMAT, detail))
        events.extend(Frame(request) for request in nested_requests(data))

    def _collect(self, chunk: bytes, start: int, end: int, events: list[Frame | FramingError]) -> None:
        if self._oversize:
            return
        if len(self._buf) + (end - start) > self.max_frame_bytes:
            self._oversize = True
            self._buf.clear()
            events.append(FramingError(ErrorCode.FRAME_TOO_LARGE, f"frame over {self.max_frame_bytes} bytes"))
        else:
            self._buf += chunk[start:end]

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
            if not self._stack:
                # Outside a frame: skip to the next '{' quickly, noting a stray '}' (not one of a dropped frame).
                start = chunk.find(b"{", i)
                stop = n if start < 0 else start
                close = i
                while self._skip_closes or not stray_close_reported:
                    close = chunk.find(b"}", close, stop)
                    if close < 0:
                        break
                    close += 1
                    if self._skip_closes:
                        self._skip_closes -= 1
                    else:
                        events.append(FramingError(ErrorCode.REACE_RESET))
                        stray_close_reported = True
                if start < 0:
                    return events
                self._stack.append(_OPEN)
                self._expect = _KEY_OR_END
                self._buf = bytearray(b"{")
                i = start + 1
                continue
            j, broke = self._scan(chunk, i)
            if broke:
                # Not JSON any more (rule 7): drop the frame, answer what was nested in it, and resynchronise
                # at the offending '{' or else at the next one.
                self._collect(chunk, i, j, events)
                opened = self._stack.count(_OPEN) - (chunk[j] == _CLOSE)
                self._abandon(events, "invalid JSON, skipped to the next '{'")
                self._skip_closes += opened
                i = j if chunk[j] == _OPEN else j + 1
                continue
            if j < n and self._in_string and chunk[j] == _NEWLINE:
                # A raw newline inside a string is illegal JSON: a lost quote; drop and resync (rule 4).
                self._collect(chunk, i, j, events)
                self._abandon(events, "newline inside a string")
                i = j + 1
                continue
            self._collect(chunk, i, j, events)
            i = j
            if not self._stack:
                if self._oversize:
                    self._reset_frame()
                else:
                    data = bytes(self._buf)
                    self._reset_frame()
                    self._skip_closes = 0  # a frame completed: closes after it are stray again
                    self._complete(data, events)
        return events

    def _scan(self, chunk: bytes, j: int) -> tuple[int, bool]:
        """Follow the frame's JSON syntax from chunk[j]: (where the scan stopped, whether the frame broke).

        It stops after the frame's closing brace, at a raw newline inside a string, at the first byte no
        JSON text can have there (broke), or at the end of the chunk. Strings are crossed with one search."""
        n = len(chunk)
        stack, expect = self._stack, self._expect
        in_string, escaped, key, scalar_open = self._in_string, self._escaped, self._key, self._scalar_open
        token, in_string_stop = _TOKEN.match, _IN_STRING.search
        try:
            while j < n:
                if in_string:
                    if escaped:
                        escaped = False
                        j += 1
                        continue
                    m = in_string_stop(chunk, j)
                    if m is None:
                        return n, False
                    j = m.start()
                    b = chunk[j]
                    if b == _NEWLINE:
                        return j, False
                    if b == _BACKSLASH:
                        escaped = True
                    else:
                        in_string = False
                        expect = _COLON_NEXT if key else _AFTER_VALUE
                    j += 1
                    continue
                m = token(chunk, j)
                assert m is not None  # every part of _TOKEN is optional
                kind = m.lastindex
                if kind is None:  # only whitespace up to the end of the chunk
                    return n, False
                pos = m.start(kind)
                if kind == 2:
                    if not (scalar_open and pos == 0):  # else: the rest of a value cut by the last chunk
                        if expect != _VALUE and expect != _VALUE_OR_END:
                            return pos, True
                        expect = _AFTER_VALUE
                    j = m.end()
                    scalar_open = j == n
                    continue
                scalar_open = False
                if kind == 3:
                    return pos, True
                b = chunk[pos]
                j = pos + 1
                if b == _QUOTE:
                    if expect == _KEY_OR_END or expect == _KEY:
                        key = True
                    elif expect == _VALUE or expect == _VALUE_OR_END:
                        key = False
                    else:
                        return pos, True
                    in_string = True
                elif b == _OPEN or b == _LBRACKET:
                    if expect != _VALUE and expect != _VALUE_OR_END:
                        return pos, True
                    stack.append(b)
                    expect = _KEY_OR_END if b == _OPEN else _VALUE_OR_END
                elif b == _CLOSE or b == _RBRACKET:
                    if stack[-1] != (_OPEN if b == _CLOSE else _LBRACKET) or not (
                            expect == _AFTER_VALUE or expect == (_KEY_OR_END if b == _CLOSE else _VALUE_OR_END)):
                        return pos, True
                    stack.pop()
                    expect = _AFTER_VALUE
                    if not stack:
                        return j, False
                elif b == _COLON:
                    if expect != _COLON_NEXT:
                        return pos, True
                    expect = _VALUE
                else:  # comma
                    if expect != _AFTER_VALUE:
                        return pos, True
                    expect = _KEY if stack[-1] == _OPEN else _VALUE
            return n, False
        finally:
            self._expect = expect
            self._in_string, self._escaped, self._key, self._scalar_open = in_string, escaped, key, scalar_open

    def _complete(self, data: bytes, events: list[Frame | FramingError]) -> None:
        if b'"RAW"' in data[:64] or b'"BON"' in data[:64]:
            header = _binary_header(data)
            if header is not None:
                kind, size, obj = header
                given = obj.get("request_id")
                request_id = given if isinstance(given, str) else "0"
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


def _binary_header(data: bytes) -> tuple[str, int, dict[str, Any]] | None:
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


def nested_requests(frame: bytes) -> list[bytes]:
    """The complete requests (spec §6 steps 1 and 2) nested in a frame that failed, outermost first, in
    order (spec §13.1 rule 7). Binary headers are not among them: their payload was scanned as JSON."""
    if frame.find(b'"action"', 1) < 0:  # the common case: nothing that could be a request
        return []
    spans: list[tuple[int, int]] = []
    opens: list[int] = []
    in_string = False
    skip_to = 0
    for m in _NESTED.finditer(frame, 1):  # from 1: the frame's own first '{' is what failed
        pos = m.start()
        if pos < skip_to:
            continue
        b = frame[pos]
        if in_string:
            if b == _BACKSLASH:
                skip_to = pos + 2
            elif b == _QUOTE:
                in_string = False
        elif b == _QUOTE:
            in_string = True
        elif b == _OPEN:
            opens.append(pos)
        elif b == _CLOSE and opens:
            spans.append((opens.pop(), pos + 1))
    found: list[bytes] = []
    covered, parses = 0, 0
    for start, end in sorted(spans):
        if start < covered:
            continue
        span = frame[start:end]
        if b'"action"' not in span or _BINARY_HEADER.match(span):
            continue
        if parses == MAX_RESYNC_PARSES:
            break
        parses += 1
        if is_request(span):
            found.append(span)
            covered = end
    return found
