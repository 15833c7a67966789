"""The kws unit (spec §16.4): wake words from the microphone (sys.pcm) or from client audio.

Each wake outputs `true` (kws.bool) or, for a response_format containing "json", the JSON string
{"keyword", "score", "timestamp_ms"}; linked tasks (asr, llm, tts, vad) receive it as well. The
`trigger` action fakes a wake (spec §8.7). Protocol only: the model is units/kws/engine.py.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from core import bus
from core.envelope import Request, Response
from core.errors import ErrorCode, UnitError
from core.ids import ObjectType
from core.microphone import PCM_SOURCE, PcmFeed
from core.unit import Job, Task, Unit
from units.kws import UNIT
from units.kws.engine import Detection, KwsModel, load_kws, resolve_keywords

log = logging.getLogger(__name__)

PLAY_SOURCE = "sys.play"


@dataclass
class KwsState:
    model: KwsModel
    detector: Any  # the microphone's detector; only the task's worker touches it
    wake_pcm: bytes | None  # played under sys.play at each wake (enwake_audio)
    feed: PcmFeed = field(default_factory=PcmFeed)
    reset: bool = False  # the worker resets the detector before its next frames


class KwsUnit(Unit[KwsState]):
    name = UNIT.name
    names = UNIT.names
    extra_actions = ("trigger",)
    defaults: dict[str, Any] = {
        "kws": ["HEY JARVIS"],
        "kws_strict": False,
        "threshold": 0.5,
        "refractory_ms": 2000,
        "phases": 2,  # staggered 80 ms scoring grids (units/kws/engine.py): 2 cut the wake delay by ~40 ms
        "enwake_audio": True,
        "wake_wav_file": "",
        "enkws": False,
    }
    default_input = "sys.pcm"
    default_response_format = "kws.bool"
    # buttons_thread is accepted as StackFlow clients send it; unitbus has no button source to read.
    input_sources = frozenset({"sys", "kws", "buttons_thread"})
    subscribes = {"sys": PCM_SOURCE}
    max_queue_default = 8
    needs_text = False

    def load(self, task: Task[KwsState]) -> KwsState:
        params = task.params
        key = ("kws", task.manifest.mode, json.dumps(params.get("keyword_models")), str(params.get("keyword_dir")))
        try:
            model: KwsModel = self.shared_model(key, lambda: load_kws(params))
        except (OSError, ValueError) as exc:
            raise UnitError(ErrorCode.MODEL_LOADING, str(exc)) from None
        try:
            names, note = resolve_keywords(params["kws"], model.keywords)
        except ValueError as exc:
            raise UnitError(ErrorCode.MODEL_LOADING, str(exc)) from None
        if note and params["kws_strict"]:
            raise UnitError(ErrorCode.MODEL_LOADING, note)
        try:
            detector = model.detector(names, params["threshold"], params["refractory_ms"], params["phases"])
        except ValueError as exc:
            raise UnitError(ErrorCode.JSON_FORMAT, str(exc)) from None
        task.setup_note = note or ""
        wake_pcm = self._wake_sound(params) if params["enwake_audio"] else None
        if note:
            log.info("%s: %s", task.work_id, note)
        return KwsState(model, detector, wake_pcm)

    @staticmethod
    def _wake_sound(params: dict[str, Any]) -> bytes | None:
        path = params.get("wake_wav_file")
        if not path:
            return None
        from core import audio

        try:
            with open(path, "rb") as f:
                return audio.parse_wav(f.read()).astype("<i2").tobytes()
        except (OSError, audio.AudioError) as exc:
            raise UnitError(ErrorCode.MODEL_LOADING, f"wake_wav_file {path}: {exc}") from None

    # microphone --------------------------------------------------------------------------------
    def chain_arrived(self, task: Task[KwsState], source: str, response: dict | None, binary: bytes | None) -> bool:
        if source != PCM_SOURCE:
            return False
        # kws keeps listening while the board speaks: that is what makes voice barge-in work.
        if task.paused or not binary:
            return True
        if task.state.feed.add(binary):
            self.enqueue(task, self.chain_job(task, source, None, object="sys.pcm"))
        return True

    def on_chain(self, job: Job[KwsState]) -> None:
        task = job.task
        if task.state.reset:
            task.state.reset = False
            task.state.detector.reset()  # here, in the worker: the detector is not thread-safe
        pcm = task.state.feed.take()
        if pcm.size and not task.paused:
            for detection in task.state.detector.feed(pcm):
                self._wake(job, detection)

    def on_pause(self, task: Task[KwsState]) -> None:
        task.state.feed.clear()

    def on_work(self, task: Task[KwsState]) -> None:
        # A fresh start: audio from before the pause must not complete a wake word now.
        task.state.feed.clear()
        task.state.reset = True

    # client audio ------------------------------------------------------------------------------
    def on_inference(self, job: Job[KwsState]) -> None:
        task = job.task
        pcm = job.pcm()
        if not pcm.size:
            raise UnitError(ErrorCode.EMPTY_DATA)
        # A clip is judged on its own, with a detector of its own: it must not disturb the microphone's.
        detector = task.state.model.detector(task.state.detector.keywords, task.params["threshold"],
                                             task.params["refractory_ms"], task.params["phases"])
        for detection in [*detector.feed(pcm), *detector.flush()]:
            if job.cancelled:
                return
            self._wake(job, detection)

    # wakes -------------------------------------------------------------------------------------
    def _wake(self, job: Job[KwsState], detection: Detection) -> None:
        task = job.task
        if "json" in ObjectType.parse(task.response_format).flags:
            job.emit(json.dumps({"keyword": detection.keyword, "score": round(detection.score, 3),
                                 "timestamp_ms": detection.timestamp_ms}))
        else:
            job.emit(True)
        wake_pcm = task.state.wake_pcm
        if wake_pcm:
            self.publish(PLAY_SOURCE, binary=wake_pcm)

    async def on_action(self, task: Task[KwsState] | None, request: Request, route: bus.Route, binary: bytes | None) -> Response | None:
        if task is None:
            raise UnitError(ErrorCode.UNIT_NOT_EXIST)
        job = Job(self, task, request.request_id, "kws.trigger", None)
        keyword = task.state.detector.keywords[0]
        # After the reply (spec §8.7 shows the reply first, then the kws.bool output).
        self.loop.call_soon(self._wake, job, Detection(keyword, 1.0, 0))  # type: ignore[union-attr]
        return Response(request.request_id, task.work_id)
