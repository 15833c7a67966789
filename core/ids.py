"""work_id and object-type values (spec §5.1, §11.1), parsed exactly: no substring matching."""
from __future__ import annotations

import re
from dataclasses import dataclass

UNIT_NAME = re.compile(r"[a-z][a-z0-9_]*")
TASK_ID = re.compile(r"([a-z][a-z0-9_]*)\.(\d+)")
BOARD_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a NATS subject token and a work_id suffix


@dataclass(frozen=True)
class WorkId:
    unit: str
    number: int | None = None

    @classmethod
    def parse(cls, text: str) -> "WorkId | None":
        """'sys' / '' -> sys; 'llm' -> unit; 'llm.1002' -> task; 'sys.<anything>' -> sys; else None."""
        if text == "":
            return cls("sys")
        if text == "sys" or text.startswith("sys."):
            return cls("sys")
        m = TASK_ID.fullmatch(text)
        if m:
            return cls(m.group(1), int(m.group(2)))
        if UNIT_NAME.fullmatch(text):
            return cls(text)
        return None

    @property
    def is_task(self) -> bool:
        return self.number is not None

    def __str__(self) -> str:
        return self.unit if self.number is None else f"{self.unit}.{self.number}"


ANY_BOARD = "*"  # `llm@*`: any board of the fleet that serves the model (a load-balanced inference)


def split_board(text: str) -> tuple[str, str | None]:
    """'llm.1003@kitchen' -> ('llm.1003', 'kitchen'); 'llm@*' -> ('llm', '*'); no '@' -> (text, None);
    a bad board name -> (text, '')."""
    local, sep, board = text.rpartition("@")
    if not sep:
        return text, None
    return (local, board) if BOARD_NAME.fullmatch(board) or board == ANY_BOARD else (text, "")


def on_board(work_id: str, board: str) -> str:
    """A work_id as seen from another board: 'llm.1003' -> 'llm.1003@kitchen'."""
    return f"{work_id or 'sys'}@{board}"


def is_task_id(text: str) -> bool:
    return TASK_ID.fullmatch(text) is not None


def is_task_ref(text: str) -> bool:
    """What `input` and `link` may name: a task here ('asr.1001') or on a board ('asr.1001@mic')."""
    local, board = split_board(text)
    return is_task_id(local) and board not in ("", ANY_BOARD)


@dataclass(frozen=True)
class ObjectType:
    namespace: str
    flags: frozenset[str]

    @classmethod
    def parse(cls, text: str | None) -> "ObjectType":
        parts = (text or "").split(".")
        return cls(parts[0], frozenset(parts[1:]))

    def has(self, flag: str) -> bool:
        return flag in self.flags

    @property
    def stream(self) -> bool:
        return "stream" in self.flags

    @property
    def base64(self) -> bool:
        return "base64" in self.flags
