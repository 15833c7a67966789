"""skel: the template unit. Text in, transformed text out, streamed or not.

Setup keys: `mode` (upper, lower, reverse, echo), `delay_ms` between streamed pieces, which lets a
test pause a stream in the middle, and `load_ms`, how long loading the "model" takes (a slow setup).
Inputs: user text (`skel.*`) and a linked skel task's outputs.
"""
from __future__ import annotations

import time
from typing import Any

from core.errors import ErrorCode, UnitError
from core.unit import Job, Task, Unit
from units.skel import UNIT
from units.skel.engine import MODES, pieces, transform


class SkelUnit(Unit[None]):
    name = UNIT.name
    names = UNIT.names
    defaults: dict[str, Any] = {"mode": "upper", "delay_ms": 0, "load_ms": 0}
    default_input = "skel.utf-8"
    default_response_format = "skel.utf-8"
    link_kinds = frozenset({"skel"})
    input_sources = frozenset({"skel"})

    def load(self, task: Task[None]) -> None:
        if task.params["mode"] not in MODES:
            raise UnitError(ErrorCode.MODEL_LOADING, f"mode must be one of {', '.join(MODES)}")
        if task.params["delay_ms"] < 0 or task.params["load_ms"] < 0:
            raise UnitError(ErrorCode.JSON_FORMAT, "delay_ms and load_ms must not be negative")
        time.sleep(task.params["load_ms"] / 1000)

    def on_inference(self, job: Job[None]) -> None:
        if not isinstance(job.payload, str):
            raise UnitError(ErrorCode.JSON_FORMAT, "data: expected string")
        self._transform(job, job.payload)

    def on_chain(self, job: Job[None]) -> None:
        # A linked skel task's final output (or each chunk's delta) becomes this task's input.
        data = (job.payload or {}).get("data")
        text = data.get("delta") if isinstance(data, dict) else data
        if isinstance(text, str) and text:
            self._transform(job, text)

    def _transform(self, job: Job[None], text: str) -> None:
        task = job.task
        result = transform(text, task.params["mode"])
        if not task.stream_output:
            job.emit(result)
            return
        delay = task.params["delay_ms"] / 1000
        for piece in pieces(result):
            if job.cancelled:
                break
            job.stream(piece)
            if delay:
                job.cancel.wait(delay)
        job.stream("", True)
