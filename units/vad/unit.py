"""The vad unit (spec §16.5): `true` when speech starts, `false` when it ends, from the microphone or
client audio. Linked to a kws task, it listens only after a wake and goes back to sleep after one
speech segment. Protocol only: the model is units/vad/engine.py.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from core.errors import ErrorCode, UnitError
from core.microphone import PCM_SOURCE, PcmFeed, frame_playing
from core.unit import Job, Task, Unit
from units.vad import UNIT

if TYPE_CHECKING:
    from units.vad.engine import VadModel, VadSegmenter

log = logging.getLogger(__name__)


@dataclass
class VadState:
    model: VadModel
    segmenter: VadSegmenter  # the microphone's; only the task's worker touches it
    feed: PcmFeed = field(default_factory=PcmFeed)
    awake: bool = False  # only matters while a kws task is linked
    reset: bool = False  # the worker resets the segmenter before its next frames


class VadUnit(Unit[VadState]):
    name = UNIT.name
    names = UNIT.names
    defaults: dict[str, Any] = {
        "silero_vad.threshold": 0.5,
        "silero_vad.min_silence_duration": 0.5,
        "silero_vad.min_speech_duration": 0.25,
        "silero_vad.window_size": 512,
    }
    default_input = "sys.pcm"
    default_response_format = "vad.bool"
    link_kinds = frozenset({"kws"})
    input_sources = frozenset({"sys", "vad"})
    subscribes = {"sys": PCM_SOURCE}
    max_queue_default = 8
    needs_text = False

    def load(self, task: Task[VadState]) -> VadState:
        # Imported with the first task: a vad unit nobody sets up (the README's chain) stays without numpy
        # and onnxruntime (8 MB less).
        from units.vad.engine import WINDOW, load_vad

        params = task.params
        if params["silero_vad.window_size"] != WINDOW:  # checked here too: a shared model skips load_vad
            raise UnitError(ErrorCode.MODEL_LOADING, f"silero_vad.window_size must be {WINDOW} at 16 kHz")
        key = ("vad", task.manifest.mode, str(params.get("silero_vad.model")))
        try:
            model: VadModel = self.shared_model(key, lambda: load_vad(params))
        except (OSError, ValueError) as exc:
            raise UnitError(ErrorCode.MODEL_LOADING, str(exc)) from None
        return VadState(model, self._segmenter(task, model))

    @staticmethod
    def _segmenter(task: Task[VadState], model: VadModel) -> VadSegmenter:
        params = task.params
        try:
            return model.segmenter(params["silero_vad.threshold"], params["silero_vad.min_speech_duration"],
                                   params["silero_vad.min_silence_duration"])
        except ValueError as exc:
            raise UnitError(ErrorCode.JSON_FORMAT, str(exc)) from None

    @staticmethod
    def _gated(task: Task[VadState]) -> bool:
        return "kws" in task.upstream.values()

    # microphone --------------------------------------------------------------------------------
    def chain_arrived(self, task: Task[VadState], source: str, response: dict | None, binary: bytes | None) -> bool:
        if task.upstream.get(source) == "kws":
            if not task.state.awake:
                task.state.awake = True
                task.state.feed.clear()
                task.state.reset = True  # the worker resets the segmenter (it owns it)
            return True
        if source != PCM_SOURCE:
            return False
        if task.paused or not binary or (self._gated(task) and not task.state.awake):
            return True
        if frame_playing(response):
            return True  # the board's own voice (marked so only under audio.mute_capture_while_playing)
        if task.state.feed.add(binary):
            self.enqueue(task, self.chain_job(task, source, None, object="sys.pcm"))
        return True

    def on_chain(self, job: Job[VadState]) -> None:
        task = job.task
        segmenter = task.state.segmenter
        if task.state.reset:
            task.state.reset = False
            segmenter.reset()
        pcm = task.state.feed.take()
        if not pcm.size or task.paused:
            return
        for event in segmenter.feed(pcm):
            job.emit(event.speech)
            if not event.speech and self._gated(task):
                task.state.awake = False  # one segment per wake
                task.state.feed.clear()
                segmenter.reset()
                return

    def on_pause(self, task: Task[VadState]) -> None:
        task.state.feed.clear()
        task.state.reset = True

    def on_work(self, task: Task[VadState]) -> None:
        task.state.feed.clear()
        task.state.reset = True

    # client audio ------------------------------------------------------------------------------
    def on_inference(self, job: Job[VadState]) -> None:
        pcm = job.pcm()
        if not pcm.size:
            raise UnitError(ErrorCode.EMPTY_DATA)
        # A clip is segmented on its own: it must not disturb the microphone's state.
        segmenter = self._segmenter(job.task, job.task.state.model)
        for event in [*segmenter.feed(pcm), *segmenter.flush()]:
            if job.cancelled:
                return
            job.emit(event.speech)
