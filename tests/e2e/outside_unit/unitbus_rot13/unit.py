"""The rot13 unit: rotates letters by the `rot13.shift` setting; streams one word per chunk.

It also publishes every result under its own source, `rot13.words`, with no task behind it: a task
whose input lists `words.rot13` subscribes to it (and rotates what it hears once more). sys counts the
source's subscribers for this unit, as it does sys.pcm's for the audio unit; `listeners` reports them."""
from __future__ import annotations

import codecs
import string
from typing import Any

from core import bus

from core.envelope import Request, Response
from core.errors import ErrorCode, UnitError
from core.unit import Job, Task, Unit
from unitbus_rot13 import UNIT, Rot13Settings

WORDS = "rot13.words"


def rotate(text: str, shift: int) -> str:
    if shift == 13:
        return codecs.encode(text, "rot13")
    lower, upper = string.ascii_lowercase, string.ascii_uppercase
    table = str.maketrans(lower + upper, lower[shift:] + lower[:shift] + upper[shift:] + upper[:shift])
    return text.translate(table)


class Rot13Unit(Unit[None]):
    name = UNIT.name
    names = UNIT.names
    defaults: dict[str, Any] = {}
    default_input = "rot13.utf-8"
    default_response_format = "rot13.utf-8"
    # "rot13.utf-8", "caesar.utf-8": text from clients; "words.rot13": the published results
    input_sources = frozenset({*UNIT.names, "words"})
    subscribes = {"words": WORDS}
    extra_actions = ("listeners",)

    def __init__(self, settings: Any):
        super().__init__(settings)
        self.shift = settings.section(UNIT.name, Rot13Settings).shift % 26

    def published_sources(self) -> dict[str, str]:
        return {WORDS: ""}

    def on_inference(self, job: Job[None]) -> None:
        if not isinstance(job.payload, str):
            raise UnitError(ErrorCode.JSON_FORMAT, "data: expected string")
        result = rotate(job.payload, self.shift)
        self.publish(WORDS, data=result)
        if not job.task.stream_output:
            job.emit(result)
            return
        for word in result.split(" "):
            job.stream(word + " ")
        job.stream("", True)

    def on_chain(self, job: Job[None]) -> None:
        data = (job.payload or {}).get("data")
        if isinstance(data, str):
            job.emit(rotate(data, self.shift))

    async def on_action(self, task: Task[None] | None, request: Request, route: bus.Route,
                        binary: bytes | None) -> Response | None:
        return Response(request.request_id, request.work_id, data=dict(self.subscribers))


if __name__ == "__main__":
    Rot13Unit.main()
