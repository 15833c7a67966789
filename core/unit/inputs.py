"""What a task takes in (spec §8.2, §10.5, §12): its input list, links to upstream tasks, and the data
of a client's inference. Pure functions of the facts passed in, so they are tested without a bus."""
from __future__ import annotations

import base64
import binascii
from typing import Any, Iterable

from core.envelope import NONE
from core.errors import ErrorCode, UnitError
from core.ids import ObjectType, is_task_ref, split_board
from core.manifest import Manifest


def source_token(entry: str) -> str:
    """The first token of a non-task input entry: "sys" for sys.pcm, "llm" for llm.utf-8."""
    return entry.split(".", 1)[0]


def check_source(entry: str, accepted: frozenset[str], subscribed: Iterable[str]) -> tuple[str, str | None]:
    """The token of a non-task input entry this unit takes, and the board when it names another board's
    published source (`sys.pcm@mic`: only a source the unit subscribes to); else -19 naming the entry."""
    local, board = split_board(entry)
    token = source_token(local)
    if token not in accepted or (board is not None and local not in subscribed):
        raise UnitError(ErrorCode.UNSUPPORTED_LINK, entry)
    return token, board


def check_link(work_id: str, upstream: Any, unit_name: str, link_kinds: frozenset[str], manifest: Manifest,
               snapshot: dict[str, dict[str, Any]]) -> str:
    """The unit kind of an upstream task `work_id` may link to, checked against the units and the
    manifests (spec §12: the upstream's output type must be one the downstream model takes)."""
    if not isinstance(upstream, str) or not is_task_ref(upstream):
        raise UnitError(ErrorCode.LINK_FALSE)
    if upstream == work_id:
        raise UnitError(ErrorCode.UNSUPPORTED_LINK, f"{upstream} cannot link to itself")
    other = snapshot.get(upstream)
    if other is None:
        raise UnitError(ErrorCode.LINK_FALSE)
    kind = upstream.split(".")[0]
    if kind not in link_kinds:
        raise UnitError(ErrorCode.UNSUPPORTED_LINK, f"{unit_name} does not take input from {kind}")
    produced = other.get("response_format", "")
    accepted = manifest.input_type
    if produced and not any(t == produced or t.split(".")[0] == produced.split(".")[0] for t in accepted):
        raise UnitError(ErrorCode.UNSUPPORTED_LINK, f"{upstream} outputs {produced}, which {manifest.mode} does not take")
    return kind


def inference_payload(object: str, data: Any, binary: bytes | None, needs_text: bool) -> Any:
    """A whole inference's data as the unit's jobs take it: text, or bytes for audio and base64 objects.

    `data` is the request's data, or a stream's reassembled text (spec §10.5); a RAW frame is `binary`."""
    payload: Any = binary if binary is not None else data
    if binary is None and (ObjectType.parse(object).base64 or not needs_text):
        if not isinstance(payload, str):
            raise UnitError(ErrorCode.JSON_FORMAT, "data must be a base64 string")
        try:
            payload = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise UnitError(ErrorCode.BASE64_DECODING) from None
    if payload in ("", b"", None, NONE) or (isinstance(payload, str) and not payload.strip() and needs_text):
        raise UnitError(ErrorCode.EMPTY_DATA)
    return payload
