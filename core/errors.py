"""The error-code table of spec §15, defined once.

`message` texts are StackFlow's exact wording (typos included); unitbus may append ": <detail>".
"""
from __future__ import annotations

import enum
from collections.abc import Callable


class ErrorCode(enum.IntEnum):
    OK = 0
    REACE_RESET = -1
    JSON_FORMAT = -2
    ACTION_MATCH = -3
    INFERENCE_PUSH = -4
    MODEL_LOADING = -5
    UNIT_NOT_EXIST = -6
    RESOURCE_ALLOCATION = -8
    UNIT_CALL = -9
    NOT_AVAILABLE = -10
    MODEL_RUN = -11
    FILE_PATH = -17
    NO_UNIT_ACTION = -18
    LINK_FALSE = -20
    TASK_FULL = -21
    UNSUPPORTED_LINK = -22
    BASE64_DECODING = -23
    EMPTY_DATA = -24
    STREAM_INDEX = -25
    ACTION_DISABLED = -30
    UNAUTHORIZED = -31
    QUEUE_FULL = -32
    TIMEOUT = -33
    FRAME_TOO_LARGE = -34
    CONTEXT_EXCEEDED = -35
    CANCELLED = -36
    UNSUPPORTED_OBJECT = -37
    OPERATION_FAILED = -38

    @property
    def text(self) -> str:
        return MESSAGES[self]


MESSAGES: dict[ErrorCode, str] = {
    ErrorCode.OK: "",
    ErrorCode.REACE_RESET: "reace reset",
    ErrorCode.JSON_FORMAT: "json format error",
    ErrorCode.ACTION_MATCH: "action match false",
    ErrorCode.INFERENCE_PUSH: "inference data push false",
    ErrorCode.MODEL_LOADING: "Model loading failed",
    ErrorCode.UNIT_NOT_EXIST: "Unit Does Not Exist",
    ErrorCode.RESOURCE_ALLOCATION: "Unit Resource Allocation Failed",
    ErrorCode.UNIT_CALL: "unit call false",
    ErrorCode.NOT_AVAILABLE: "Not available at the moment.",
    ErrorCode.MODEL_RUN: "Model run failed.",
    ErrorCode.FILE_PATH: "file path error",
    ErrorCode.NO_UNIT_ACTION: "not have unit action!",
    ErrorCode.LINK_FALSE: "link false",
    ErrorCode.TASK_FULL: "task full",
    ErrorCode.UNSUPPORTED_LINK: "unsupported link target",
    ErrorCode.BASE64_DECODING: "Base64 decoding error.",
    ErrorCode.EMPTY_DATA: "The inference data is empty.",
    ErrorCode.STREAM_INDEX: "Stream data index error.",
    ErrorCode.ACTION_DISABLED: "action disabled",
    ErrorCode.UNAUTHORIZED: "unauthorized",
    ErrorCode.QUEUE_FULL: "inference queue full",
    ErrorCode.TIMEOUT: "timeout",
    ErrorCode.FRAME_TOO_LARGE: "frame too large",
    ErrorCode.CONTEXT_EXCEEDED: "input exceeds context window",
    ErrorCode.CANCELLED: "request cancelled",
    ErrorCode.UNSUPPORTED_OBJECT: "unsupported object type",
    ErrorCode.OPERATION_FAILED: "operation failed",
}

# Messages that StackFlow words differently for the same code.
FILE_MISSING = "file does not exist."
PARAMETER_FORMAT = "Parameter format error."


def error_message(code: ErrorCode, detail: str | None = None) -> str:
    base = code.text
    if detail:
        return f"{base}: {detail}" if base else detail
    return base


class UnitError(Exception):
    """Raised anywhere in a request's handling; the error boundary turns it into an error envelope."""

    def __init__(self, code: ErrorCode, detail: str | None = None, *, message: str | None = None):
        self.code = ErrorCode(code)
        self.message = message if message is not None else error_message(self.code, detail)
        super().__init__(self.message)

    def __reduce__(self) -> tuple[Callable[[int, str], UnitError], tuple[int, str]]:
        return (_rebuild, (int(self.code), self.message))


def _rebuild(code: int, message: str) -> "UnitError":
    return UnitError(ErrorCode(code), message=message)
