"""HS256 JWTs for Ai00's admin token exchange (http-apis.md §4.8): a few lines of hmac, no dependency."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any


class TokenError(ValueError):
    pass


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode(claims: dict[str, Any], secret: str) -> str:
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(signature)}"


def decode(token: str, secret: str, now: float | None = None) -> dict[str, Any]:
    """The claims of a valid, unexpired token; TokenError otherwise."""
    try:
        header, payload, signature = token.split(".")
        head = json.loads(_unb64(header))
        claims = json.loads(_unb64(payload))
        given = _unb64(signature)
    except (ValueError, TypeError):
        raise TokenError("malformed token") from None
    if not isinstance(head, dict) or head.get("alg") != "HS256" or not isinstance(claims, dict):
        raise TokenError("unsupported token")
    expected = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, given):
        raise TokenError("bad signature")
    exp = claims.get("exp")
    if not isinstance(exp, (int, float)) or exp < (time.time() if now is None else now):
        raise TokenError("token expired")
    return claims


def issue(app_id: str, secret: str, expire_sec: int) -> str:
    return encode({"sid": app_id, "exp": int(time.time()) + int(expire_sec)}, secret)
