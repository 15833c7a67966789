"""The asr unit, also serving `whisper` (spec §16.2, §16.3): speech to text with Whisper.

Inputs: the microphone (sys.pcm), cut into utterances by trailing silence (rule1/rule2) and length
(rule3); a linked kws task (asleep until a wake, then listening after `awake_delay`, asleep again after
each utterance); a linked vad task (its `false` transcribes the buffered audio at once); and client
audio (asr.* / whisper.* objects, RAW frames). Whisper cannot give partial hypotheses, so a stream
format gets one `finish:true` chunk per utterance (spec §10.3). Protocol only: the model is engine.py.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from core import audio
from core.errors import ErrorCode, UnitError
from core.microphone import PCM_SOURCE, frame_playing
from core.unit import Job, Task, Unit
from units.asr import UNIT, AsrSettings
from units.asr.endpoint import EndpointConfig, Endpointer
from units.asr.engine import AsrEngine, load_asr

log = logging.getLogger(__name__)

MAX_CLIP_S = 30.0  # Whisper reads 30 s at most: longer client audio is cut into utterances first
# whisper's own defaults where they differ from asr's (spec §16.3)
WHISPER_DEFAULTS = {"response_format": "asr.utf-8", "awake_delay": 1000}
_TRAILING_PUNCTUATION = re.compile(r"[\s.,!?;:。，！？]+$")


def stackflow_text(text: str) -> str:
    """StackFlow's shape of a final transcript: lower case, ending in exactly one "." (spec §10.3)."""
    text = _TRAILING_PUNCTUATION.sub("", text.strip()).lower()
    return text + "." if text else ""


@dataclass
class AsrState:
    engine: AsrEngine
    endpointer: Endpointer
    awake: bool = False  # only matters while a kws task is linked
    listen_at: float = 0.0  # a wake's awake_delay: the microphone is heard from then on


class AsrUnit(Unit[AsrState]):
    name = UNIT.name
    names = UNIT.names
    trim_when_idle = True
    defaults: dict[str, Any] = {
        "language": "en",
        "awake_delay": 50,
        "rule1": 2.4,
        "rule2": 1.2,
        "rule3": 30.0,
        "silence_timeout": 0,
        "enkws": False,
    }
    default_input = "sys.pcm"
    default_response_format = "asr.utf-8.stream"
    link_kinds = frozenset({"kws", "vad"})
    input_sources = frozenset({"sys", "asr", "whisper"})
    subscribes = {"sys": PCM_SOURCE}
    max_queue_default = 8
    needs_text = False

    def __init__(self, settings):
        super().__init__(settings)
        self.config = settings.section(UNIT.name, AsrSettings)

    def setup_data(self, name: str, data: dict[str, Any]) -> dict[str, Any]:
        return {**WHISPER_DEFAULTS, **data} if name == "whisper" else data

    def load(self, task: Task[AsrState]) -> AsrState:
        params = task.params
        language = str(params.get("language") or "en").lower()
        if language not in ("en", "english"):
            raise UnitError(ErrorCode.MODEL_LOADING, f"{task.manifest.mode} is English-only (language {language})")
        if params["awake_delay"] < 0 or params["silence_timeout"] < 0:
            raise UnitError(ErrorCode.JSON_FORMAT, "awake_delay and silence_timeout must not be negative")
        progress = task.progress
        if progress:
            progress(0)
        try:
            engine: AsrEngine = load_asr(params, self.shared_model)
        except (OSError, ValueError, KeyError) as exc:
            raise UnitError(ErrorCode.MODEL_LOADING, str(exc)) from None
        if progress:
            progress(100)
        return AsrState(engine, Endpointer(EndpointConfig.from_params(params)))

    @staticmethod
    def _gated(task: Task[AsrState]) -> bool:
        return "kws" in task.upstream.values()

    def _sleep(self, task: Task[AsrState]) -> None:
        task.state.awake = False
        task.state.endpointer.reset()

    # microphone and links (event loop: only cheap bookkeeping here) ----------------------------
    def chain_arrived(self, task: Task[AsrState], source: str, response: dict | None, binary: bytes | None) -> bool:
        kind = task.upstream.get(source)
        if kind == "kws":
            task.state.awake = True
            task.state.listen_at = time.monotonic() + task.params["awake_delay"] / 1000
            task.state.endpointer.reset()
            return True
        if kind == "vad":
            if (response or {}).get("data") is False:
                self._endpoint(task, task.state.endpointer.flush())
            return True
        if source != PCM_SOURCE:
            return False
        if task.paused or not binary or len(binary) % 2:
            return True
        gated = self._gated(task)
        if gated and not task.state.awake:
            return True
        if time.monotonic() < task.state.listen_at:
            return True
        if frame_playing(response):
            return True  # the board's own voice (marked so only under audio.mute_capture_while_playing)
        endpointer = task.state.endpointer
        self._endpoint(task, endpointer.push(audio.pcm_from_bytes(binary)))
        timeout = task.params["silence_timeout"]
        if gated and timeout and not endpointer.has_speech and endpointer.trailing_silence * 1000 >= timeout:
            log.debug("%s: %d ms without speech after the wake; asleep", task.work_id, timeout)
            self._sleep(task)
        return True

    def _endpoint(self, task: Task[AsrState], endpoint) -> None:
        if endpoint is None:
            return
        if self._gated(task):
            self._sleep(task)  # one utterance per wake (spec §12.1)
        if endpoint.has_speech and endpoint.pcm.size:
            log.debug("%s: utterance of %.2f s (rule %d)", task.work_id, endpoint.pcm.size / audio.RATE, endpoint.rule)
            self.enqueue(task, self.chain_job(task, PCM_SOURCE, endpoint.pcm, object="utterance"))

    def on_chain(self, job: Job[AsrState]) -> None:
        text = job.task.state.engine.transcribe(job.payload)
        if text.strip():
            self._deliver(job, text)

    def on_pause(self, task: Task[AsrState]) -> None:
        task.state.endpointer.reset()
        task.drop_chain_jobs()

    def on_work(self, task: Task[AsrState]) -> None:
        task.state.endpointer.reset()

    # client audio ------------------------------------------------------------------------------
    def on_inference(self, job: Job[AsrState]) -> None:
        pcm = job.pcm()
        if not pcm.size:
            raise UnitError(ErrorCode.EMPTY_DATA)
        engine = job.task.state.engine
        texts = []
        for piece in self._pieces(job.task, pcm):
            if job.cancelled:
                return
            texts.append(engine.transcribe(piece))
        self._deliver(job, " ".join(t.strip() for t in texts if t.strip()))

    @staticmethod
    def _pieces(task: Task[AsrState], pcm: np.ndarray) -> list[np.ndarray]:
        """A clip Whisper can read at once, or its utterances when it is longer than 30 s."""
        if pcm.size <= MAX_CLIP_S * audio.RATE:
            return [pcm]
        endpointer = Endpointer(EndpointConfig.from_params(task.params))
        pieces = []
        step = audio.RATE // 100
        for start in range(0, pcm.size, step):
            endpoint = endpointer.push(pcm[start:start + step])
            if endpoint is not None and endpoint.has_speech:
                pieces.append(endpoint.pcm)
        last = endpointer.flush()
        if last is not None:
            pieces.append(last.pcm)
        return pieces

    # output ------------------------------------------------------------------------------------
    def _deliver(self, job: Job[AsrState], text: str) -> None:
        if self.config.stream_style == "stackflow":
            text = stackflow_text(text)
        if job.task.stream_output:
            job.stream(text, True)
        else:
            job.emit(text)
