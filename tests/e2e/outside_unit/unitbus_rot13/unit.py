"""The rot13 unit: rotates letters by the `rot13.shift` setting; streams one word per chunk."""
from __future__ import annotations

import codecs
import string
from typing import Any

from core.errors import ErrorCode, UnitError
from core.unit import Job, Task, Unit
from unitbus_rot13 import UNIT


def rotate(text: str, shift: int) -> str:
    if shift == 13:
        return codecs.encode(text, "rot13")
    lower, upper = string.ascii_lowercase, string.ascii_uppercase
    table = str.maketrans(lower + upper, lower[shift:] + lower[:shift] + upper[shift:] + upper[:shift])
    return text.translate(table)


class Rot13Unit(Unit):
    name = UNIT.name
    names = UNIT.names
    defaults: dict[str, Any] = {}
    default_input = "rot13.utf-8"
    default_response_format = "rot13.utf-8"
    input_sources = frozenset(UNIT.names)  # "rot13.utf-8", "caesar.utf-8": text from clients

    def load(self, task: Task) -> None:
        pass

    def on_inference(self, job: Job) -> None:
        if not isinstance(job.payload, str):
            raise UnitError(ErrorCode.JSON_FORMAT, "data: expected string")
        result = rotate(job.payload, int(self.settings["rot13.shift"]) % 26)
        if not job.task.stream_output:
            job.emit(result)
            return
        for word in result.split(" "):
            job.stream(word + " ")
        job.stream("", True)


if __name__ == "__main__":
    Rot13Unit.main()
