"""The StackFlow envelope: requests in, replies and outputs out, byte-identical to StackFlow (spec §4).

This is the only module that shapes a reply. Bridges turn bytes into `Request` with `decode_request` and
`Response` into bytes with `Response.encode`; units and sys build `Response` objects with the helpers below.
"""
from __future__ import annotations

import codecs
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from core.errors import ErrorCode, UnitError

NONE = "None"  # StackFlow writes the string "None" for absent object/data
# What the bus (msgpack) and the units can carry (spec §4.1): 64-bit signed integers, finite floats,
# well-formed Unicode, and this much nesting of objects and arrays.
INT_MIN, INT_MAX = -2 ** 63, 2 ** 63 - 1
MAX_DEPTH = 64


def _replace_with_fffd(err: UnicodeError) -> tuple[bytes, int]:
    assert isinstance(err, UnicodeEncodeError)  # registered for encode_text only
    # Lone surrogates (from "\ud800" in a request) must never reach the wire as invalid UTF-8.
    # The UTF-8 encoder accepts only ASCII text or bytes from a handler, so give the bytes of U+FFFD.
    return ("\ufffd".encode() * (err.end - err.start), err.end)


codecs.register_error("unitbus-fffd", _replace_with_fffd)


@dataclass
class Request:
    request_id: str
    work_id: str
    action: str
    object: str = NONE
    data: Any = NONE
    token: str | None = None

    @property
    def unit(self) -> str:
        return self.work_id.split(".", 1)[0]

    def to_dict(self) -> dict[str, Any]:
        out = {"request_id": self.request_id, "work_id": self.work_id, "action": self.action,
               "object": self.object, "data": self.data}
        if self.token is not None:
            out["token"] = self.token
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Request":
        return cls(d["request_id"], d["work_id"], d["action"], d.get("object", NONE), d.get("data", NONE),
                   d.get("token"))

    def encode(self) -> bytes:
        """The JSON bytes a client would send (used by clients and tests)."""
        return canonical_json(self.to_dict())


@dataclass
class Response:
    request_id: str
    work_id: str
    object: str = NONE
    data: Any = NONE
    code: int = 0
    message: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def ok(self) -> bool:
        return self.code == 0

    def to_dict(self) -> dict[str, Any]:
        return {"created": self.created, "data": self.data,
                "error": {"code": int(self.code), "message": self.message},
                "object": self.object, "request_id": self.request_id, "work_id": self.work_id}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Response":
        err = d.get("error") or {}
        return cls(d["request_id"], d["work_id"], d.get("object", NONE), d.get("data", NONE),
                   int(err.get("code", 0)), str(err.get("message", "")), int(d.get("created", 0)))

    def encode(self, escape_braces: bool = False) -> bytes:
        """Spec §4.3: sorted keys, no whitespace, raw UTF-8, one trailing newline."""
        return canonical_json(self.to_dict(), escape_braces) + b"\n"

    @classmethod
    def decode(cls, raw: bytes | str) -> "Response":
        return cls.from_dict(json.loads(raw))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def canonical_json(obj: Any, escape_braces: bool = False) -> bytes:
    try:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(obj), ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    if escape_braces:
        text = _escape_braces_in_strings(text)
    return text.encode("utf-8", "unitbus-fffd")


def _escape_braces_in_strings(text: str) -> str:
    # MCU parsers count braces without string awareness; \u007b keeps the JSON value identical.
    out = []
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            elif ch == "{":
                out.append("\\u007b")
                continue
            elif ch == "}":
                out.append("\\u007d")
                continue
        elif ch == '"':
            in_string = True
        out.append(ch)
    return "".join(out)


class EnvelopeError(UnitError):
    """A frame that is not a valid request (dispatch steps 1 and 2, or a value the bus cannot carry);
    carries the request_id and work_id to echo."""

    def __init__(self, request_id: str, detail: str | None = None, work_id: str = "sys", request: bool = False):
        super().__init__(ErrorCode.JSON_FORMAT, detail)
        self.request_id = request_id
        self.work_id = work_id
        self.request = request  # the frame is a request (steps 1 and 2 passed); a value in it is not carriable


def _has_surrogate(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def uncarriable(value: Any) -> str | None:
    """Why `value` (decoded JSON) cannot travel on the bus, or None when it can (spec §4.1)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _has_surrogate(item):
                return "lone surrogate in a string"
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int):
            if not INT_MIN <= item <= INT_MAX:
                return "integer outside the 64-bit range"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return "NaN or Infinity"
        elif isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                return f"nested deeper than {MAX_DEPTH} levels"
            if isinstance(item, dict):
                for key, child in item.items():
                    if not isinstance(key, str):
                        return "a key that is not a string"
                    if _has_surrogate(key):
                        return "lone surrogate in a key"
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)
        else:  # bytes and the like, from a decoder other than JSON's (msgpack, across boards)
            return f"a {type(item).__name__} value (JSON has no such type)"
    return None


def _envelope(frame: bytes) -> dict[str, Any]:
    """Dispatch steps 1 and 2 of spec §6: a JSON object with string request_id, work_id and action."""
    try:
        text = frame.decode("utf-8")
    except UnicodeDecodeError:
        raise EnvelopeError("0") from None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise EnvelopeError("0") from None
    return _envelope_object(obj)


def _envelope_object(obj: Any) -> dict[str, Any]:
    """Dispatch step 2 of spec §6 on a decoded frame."""
    if not isinstance(obj, dict):
        raise EnvelopeError("0")
    request_id = obj.get("request_id")
    echo = request_id if isinstance(request_id, str) else "0"
    for key in ("request_id", "work_id", "action"):
        if not isinstance(obj.get(key), str):
            raise EnvelopeError(echo)
    return obj


def is_request(frame: bytes) -> bool:
    """Whether `frame` passes dispatch steps 1 and 2 (the framer's resync looks for such frames, §13.1)."""
    try:
        _envelope(frame)
    except EnvelopeError:
        return False
    return True


def decode_request(frame: bytes) -> Request:
    """Dispatch steps 1-3 of spec §6, then the values the bus cannot carry (§4.1), answered with the ids."""
    return _request(_envelope(frame))


def request_of(obj: Any) -> Request:
    """decode_request for a request already decoded (by msgpack, from another board): the same checks."""
    return _request(_envelope_object(obj))


def _request(obj: dict[str, Any]) -> Request:
    why = uncarriable(obj)
    if why is not None:
        raise EnvelopeError(obj["request_id"], why, obj["work_id"] or "sys", request=True)
    token = obj.get("token")
    return Request(
        request_id=obj["request_id"],
        work_id=obj["work_id"] or "sys",
        action=obj["action"],
        object=obj["object"] if isinstance(obj.get("object"), str) else NONE,
        data=obj.get("data", NONE),
        token=token if isinstance(token, str) else None,
    )


def reply(req: Request, work_id: str | None = None, *, data: Any = NONE, object: str = NONE,
          message: str = "") -> Response:
    """A successful control reply (or data reply) to `req`."""
    return Response(req.request_id, work_id or req.work_id, object, data, 0, message)


def error_reply(request_id: str, work_id: str, error: UnitError | ErrorCode, detail: str | None = None) -> Response:
    if not isinstance(error, UnitError):
        error = UnitError(error, detail)
    return Response(request_id, work_id, NONE, NONE, int(error.code), error.message)


def stream_data(index: int, delta: Any, finish: bool, **extra: Any) -> dict[str, Any]:
    """`data` of one stream chunk (spec §10.1)."""
    data = {"delta": delta, "finish": finish, "index": index}
    data.update(extra)
    return data


def is_stream_chunk(data: Any) -> bool:
    return isinstance(data, dict) and "delta" in data
