"""One error type for every gateway, mapped from unit codes (http-apis.md §1.7) and rendered per API."""
from __future__ import annotations

from typing import Any

from core.errors import ErrorCode

# (status, OpenAI type, OpenAI code) per unit error code.
UNIT_STATUS: dict[ErrorCode, tuple[int, str, str]] = {
    ErrorCode.JSON_FORMAT: (400, "invalid_request_error", "invalid_request"),
    ErrorCode.UNSUPPORTED_LINK: (400, "invalid_request_error", "invalid_request"),
    ErrorCode.BASE64_DECODING: (400, "invalid_request_error", "invalid_request"),
    ErrorCode.EMPTY_DATA: (400, "invalid_request_error", "invalid_request"),
    ErrorCode.STREAM_INDEX: (400, "invalid_request_error", "invalid_request"),
    ErrorCode.UNSUPPORTED_OBJECT: (400, "invalid_request_error", "unsupported_parameter"),
    ErrorCode.CONTEXT_EXCEEDED: (400, "invalid_request_error", "context_length_exceeded"),
    ErrorCode.MODEL_LOADING: (500, "api_error", "model_error"),
    ErrorCode.MODEL_RUN: (500, "api_error", "model_error"),
    ErrorCode.UNIT_NOT_EXIST: (503, "api_error", "server_busy"),  # the unit is not running (yet)
    ErrorCode.RESOURCE_ALLOCATION: (503, "api_error", "server_busy"),
    ErrorCode.UNIT_CALL: (503, "api_error", "server_busy"),
    ErrorCode.NOT_AVAILABLE: (503, "api_error", "server_busy"),
    ErrorCode.TASK_FULL: (503, "api_error", "server_busy"),
    ErrorCode.QUEUE_FULL: (503, "api_error", "server_busy"),
    ErrorCode.TIMEOUT: (504, "api_error", "timeout"),
    ErrorCode.CANCELLED: (499, "api_error", "cancelled"),
}

STATUS_DEFAULTS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("not_found_error", "model_not_found"),
    408: ("invalid_request_error", "request_timeout"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    499: ("api_error", "cancelled"),
    500: ("api_error", "model_error"),
    501: ("api_error", "unsupported_function"),
    503: ("api_error", "server_busy"),
    504: ("api_error", "timeout"),
}

# DecentralGPT codes for gateway-level failures (§2.5); unit failures use 2000 + |unit code|.
DBC_CODES = {400: 2100, 404: 2101, 501: 2102, 401: 2103, 403: 2103, 429: 2104, 503: 2104}


class GatewayError(Exception):
    """A request that fails with an HTTP status; `unit_code` when the unit answered the error."""

    def __init__(self, status: int, message: str, *, code: str | None = None, type: str | None = None,
                 param: str | None = None, unit_code: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        default_type, default_code = STATUS_DEFAULTS.get(status, ("api_error", "api_error"))
        self.type = type or default_type
        self.code = code or default_code
        self.param = param
        self.unit_code = unit_code
        self.retry_after = retry_after

    @classmethod
    def from_unit(cls, code: int, message: str, retry_after: float | None = None,
                  param: str | None = None) -> "GatewayError":
        status, type_, err_code = UNIT_STATUS.get(code, (500, "api_error", "model_error"))
        if status == 503 and retry_after is None:
            retry_after = 1.0
        return cls(status, message or _unit_text(code), code=err_code, type=type_, param=param, unit_code=code,
                   retry_after=retry_after)

    @property
    def retryable(self) -> bool:
        return self.status in (429, 503)

    def headers(self) -> dict[str, str]:
        """Retry-After for 429/503; `x-should-retry: false` elsewhere so the openai client does not
        repeat a deterministic failure (each retry costs the board a generation)."""
        if self.retryable:
            seconds = max(1, min(60, round(self.retry_after or 1)))
            return {"Retry-After": str(seconds), "retry-after-ms": str(int(seconds * 1000))}
        return {"x-should-retry": "false"}

    def dbc_code(self) -> int:
        if self.unit_code is not None:
            return 2000 + abs(self.unit_code)
        return DBC_CODES.get(self.status, 2100)

    def openai_error(self) -> dict[str, Any]:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    def openai_body(self, dbc_fields: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.openai_error()}
        if dbc_fields:
            body["code"] = self.dbc_code()
            body["message"] = self.message
        return body


def _unit_text(code: int) -> str:
    try:
        return ErrorCode(code).text
    except ValueError:
        return f"unit error {code}"
