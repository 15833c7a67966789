"""The tts unit, also serving `melotts` (spec §16.6, §10.4): text to speech with a Piper voice.

Text arrives whole (tts.utf-8), as a client stream (processed chunk by chunk: each complete sentence is
spoken at once, finish:true flushes the rest), or from a linked llm task (its stream spoken sentence by
sentence while it is generated). Audio goes to the audio unit (published under sys.play) when
response_format starts with "sys", and to the client as base64 raw PCM at `audio_rate` when `enoutput`.
A wake from a linked kws task is barge-in: buffered llm text is dropped and playback stops.
Protocol only: the voice is units/tts/engine.py.
"""
from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core import audio, bus
from core.envelope import Request
from core.errors import ErrorCode, UnitError
from core.ids import ObjectType
from core.unit import Job, Task, Unit
from units.tts import UNIT
from units.tts.engine import MAX_SPEED, MIN_SPEED, TtsError, TtsVoice, load_tts
from units.tts.text import SentenceSplitter

log = logging.getLogger(__name__)

PLAY_SOURCE = "sys.play"
MIN_RATE, MAX_RATE = 8000, 48000
# OpenAI's voice names (the ModuleLLM OpenAI plugin passes them through in setup): each model speaks
# them with its own default voice.
OPENAI_VOICES = frozenset({"alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage",
                           "shimmer", "verse"})


StreamKey = tuple[Any, ...]  # (connection, request_id) of a client's stream, ("chain", source, request_id) of a link's


@dataclass
class TtsState:
    voice: TtsVoice
    speed: float
    play: bool  # response_format sys.*: audio goes to the audio unit's player
    splitters: dict[StreamKey, SentenceSplitter] = field(default_factory=dict)  # streams being split into sentences
    out_index: dict[StreamKey, int] = field(default_factory=dict)  # output chunk index of a stream across batches
    chain_streams: set[StreamKey] = field(default_factory=set)  # llm answers with a batch queued (so a stream to end)
    deaf_until: float = 0.0  # after a barge-in, the tail of the interrupted answer is not spoken


class TtsUnit(Unit[TtsState]):
    name = UNIT.name
    names = UNIT.names
    trim_when_idle = True
    defaults: dict[str, Any] = {
        "spacker_speed": 1.0,  # StackFlow's spelling
        "speed": 1.0,
        "audio_rate": 16000,
        "awake_delay": 1000,
        "enaudio": False,
        "enkws": False,
    }
    default_input = "tts.utf-8"
    default_response_format = "sys.pcm"
    default_enoutput = False
    link_kinds = frozenset({"llm", "kws"})
    input_sources = frozenset({"tts", "melotts"})
    max_queue_default = 8
    reassemble_streams = False  # stream chunks are spoken as their sentences complete (spec §10.5)

    def load(self, task: Task[TtsState]) -> TtsState:
        params = task.params
        speed = params["spacker_speed"] if params["spacker_speed"] != 1.0 else params["speed"]
        if not MIN_SPEED <= speed <= MAX_SPEED:
            raise UnitError(ErrorCode.JSON_FORMAT, f"spacker_speed must be between {MIN_SPEED} and {MAX_SPEED}")
        if not MIN_RATE <= params["audio_rate"] <= MAX_RATE:
            raise UnitError(ErrorCode.JSON_FORMAT, f"audio_rate must be between {MIN_RATE} and {MAX_RATE} Hz")
        if params["awake_delay"] < 0:
            raise UnitError(ErrorCode.JSON_FORMAT, "awake_delay must not be negative")
        voice_params, note = self._voice_params(task)
        try:
            voice: TtsVoice = load_tts({**voice_params, "mode": task.manifest.mode}, self.shared_model)
        except (TtsError, ValueError, OSError) as exc:
            raise UnitError(ErrorCode.MODEL_LOADING, str(exc)) from None
        if voice_params.get("voice") != task.manifest.params.get("voice") and voice.backend != "piper":
            # A voice file the client named must be that voice, never the espeak-ng fallback.
            raise UnitError(ErrorCode.MODEL_LOADING, f"voice {voice_params['voice']} cannot be loaded")
        task.setup_note = note
        return TtsState(voice, float(speed), play=task.response_format.split(".")[0] == "sys")

    @staticmethod
    def _voice_params(task: Task[TtsState]) -> tuple[dict[str, Any], str]:
        """The parameters the voice loads with, and a note when a setup `voice` named no voice file.

        A setup `voice` replaces the manifest's only when it is a file reference (pkg://, a path to an
        .onnx file); a name such as OpenAI's "alloy" keeps the model's own voice."""
        params = dict(task.params)
        default = task.manifest.params.get("voice")
        asked = params.get("voice")
        if asked is None or asked == default:
            return params, ""
        if isinstance(asked, str) and (asked.startswith("pkg://") or asked.endswith(".onnx")):
            if params.get("voice_config") == task.manifest.params.get("voice_config"):
                params.pop("voice_config", None)  # the named voice's own <voice>.json
            return params, ""
        params["voice"] = default
        why = "an OpenAI voice name" if str(asked).lower() in OPENAI_VOICES else "not a voice file"
        return params, f"voice {asked} ({why}): {task.manifest.mode} speaks with its default voice"

    # client text -------------------------------------------------------------------------------
    def on_stream_chunk(self, task: Task[TtsState], request: Request, route: bus.Route) -> Job[TtsState] | None:
        chunk = request.data
        if not isinstance(chunk, dict) or not isinstance(chunk.get("delta"), str):
            raise UnitError(ErrorCode.JSON_FORMAT, "a stream chunk is {\"delta\",\"index\",\"finish\"}")
        key = ((route.client, route.conn), request.request_id)
        started = key in task.state.splitters
        sentences, finish = self._split(task, key, chunk["delta"], chunk.get("finish", True) is not False)
        if not sentences and not finish:
            return None
        job = Job(self, task, request.request_id, request.object, {"key": key, "sentences": sentences,
                                                                   "finish": finish}, route=route)
        try:
            self.enqueue(task, job, continuing=started)  # the rest of an accepted stream is never refused
        except UnitError:
            task.state.splitters.pop(key, None)  # refused: its next chunks are refused as a new stream
            raise
        return job

    @staticmethod
    def _split(task: Task[TtsState], key: StreamKey, delta: str, finish: bool) -> tuple[list[str], bool]:
        splitters = task.state.splitters
        splitter = splitters.setdefault(key, SentenceSplitter())
        sentences = splitter.feed(delta)
        if finish:
            rest = splitters.pop(key).flush()
            if rest:
                sentences.append(rest)
        return sentences, finish

    def on_inference(self, job: Job[TtsState]) -> None:
        if ObjectType.parse(job.object).has("speech"):
            self._speak_request(job)
            return
        if isinstance(job.payload, dict):
            self._speak_pieces(job)
            return
        if ObjectType.parse(job.object).flags & {"base64", "pcm", "wav"}:
            raise UnitError(ErrorCode.UNSUPPORTED_OBJECT, f"{job.object}: tts takes text")
        if not isinstance(job.payload, str):
            raise UnitError(ErrorCode.JSON_FORMAT, "data: expected string")
        self._speak(job, job.payload)
        if job.task.stream_output and job.task.enoutput and not job.cancelled:
            job.stream("", True)

    def _speak_request(self, job: Job[TtsState]) -> None:
        """tts.speech, the gateways' extension: {"input": text, "speed": number}. The speed is per request,
        so one task serves every speed without reloading the voice."""
        request = job.payload
        if not isinstance(request, dict) or not isinstance(request.get("input"), str):
            raise UnitError(ErrorCode.JSON_FORMAT, 'tts.speech: {"input": text, "speed": number}')
        speed = request.get("speed", job.task.state.speed)
        if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not MIN_SPEED <= speed <= MAX_SPEED:
            raise UnitError(ErrorCode.JSON_FORMAT, f"speed must be a number between {MIN_SPEED} and {MAX_SPEED}")
        self._speak(job, request["input"], float(speed))
        if job.task.stream_output and job.task.enoutput and not job.cancelled:
            job.stream("", True)

    # linked tasks ------------------------------------------------------------------------------
    def chain_arrived(self, task: Task[TtsState], source: str, response: dict | None, binary: bytes | None) -> bool:
        kind = task.upstream.get(source)
        if kind == "kws":
            self._barge_in(task)
            return True
        if kind != "llm" or response is None:
            return True
        if time.monotonic() < task.state.deaf_until:
            return True  # the tail of an answer the wake interrupted
        data = response.get("data")
        if isinstance(data, dict):
            delta, finish = data.get("delta"), bool(data.get("finish"))
        else:
            delta, finish = data, True
        if not isinstance(delta, str):
            return True
        key = ("chain", source, response.get("request_id"))
        sentences, finish = self._split(task, key, delta, finish)
        started = task.state.chain_streams
        if sentences or (finish and key in started):
            self.enqueue(task, self.chain_job(task, source, {"key": key, "sentences": sentences, "finish": finish}))
            if finish:
                started.discard(key)
            else:
                started.add(key)
        return True

    def on_chain(self, job: Job[TtsState]) -> None:
        self._speak_pieces(job)

    def _barge_in(self, task: Task[TtsState]) -> None:
        """Spec §12.3: drop text buffered from the llm, stop speaking, clear the play queue."""
        task.state.deaf_until = time.monotonic() + task.params["awake_delay"] / 1000
        for key in [k for k in task.state.splitters if k[0] == "chain"]:
            del task.state.splitters[key]
        task.state.chain_streams.clear()
        task.drop_chain_jobs()
        task.cancel_current(chain_only=True)
        self.publish(PLAY_SOURCE, data={"stop": True})

    def on_pause(self, task: Task[TtsState]) -> None:
        # pause stops playback and drops queued text (spec §8.4), user requests included.
        self.drop_queued(task, "pause")
        task.state.splitters.clear()
        task.state.out_index.clear()
        task.state.chain_streams.clear()
        self.publish(PLAY_SOURCE, data={"stop": True})
        task.paused = False  # tts keeps taking text after a pause; `work` is a no-op (spec §9)

    def on_exit(self, task: Task[TtsState]) -> None:
        if task.state.play:
            self.publish(PLAY_SOURCE, data={"stop": True})

    # synthesis (worker thread) -----------------------------------------------------------------
    def _speak_pieces(self, job: Job[TtsState]) -> None:
        """One batch of complete sentences of a stream; the output index runs on across batches."""
        task, payload = job.task, job.payload
        key = payload["key"]
        job.index = task.state.out_index.get(key, 0)
        for sentence in payload["sentences"]:
            if job.cancelled:
                break
            self._speak(job, sentence)
        if payload["finish"] or job.cancelled:
            # A cancelled stream is over: the base sends its finish:true chunk.
            task.state.out_index.pop(key, None)
            if payload["finish"] and task.stream_output and task.enoutput and not job.cancelled:
                job.stream("", True)
        else:
            task.state.out_index[key] = job.index
            job.finished = True  # more chunks follow: the base must not end this stream for us

    def _speak(self, job: Job[TtsState], text: str, speed: float | None = None) -> None:
        task = job.task
        voice = task.state.voice
        rate = task.params["audio_rate"]
        # A stream is resampled to the client's rate as one signal, so its chunk edges stay seamless; at the
        # bus rate the samples go out as they are.
        stream = audio.Resampler(audio.RATE, rate) if task.stream_output and rate != audio.RATE else None
        sentence: list[np.ndarray] = []  # a non-stream format answers one message per sentence
        try:
            for pcm, sentence_end in voice.iter_sentences(text, task.state.speed if speed is None else speed,
                                                          audio.RATE):
                if job.cancelled:
                    return
                if task.state.play and pcm.size:
                    self.publish(PLAY_SOURCE, binary=pcm.astype("<i2").tobytes())
                if not task.enoutput:
                    continue
                if stream is not None:
                    self._return_audio(job, audio.float_to_int16(stream.push(pcm.astype(np.float32) / 32768.0)))
                    continue
                if task.stream_output:
                    self._return_audio(job, pcm)
                    continue
                sentence.append(pcm)
                if sentence_end:
                    whole = np.concatenate(sentence)
                    sentence = []
                    if rate != audio.RATE:
                        whole = audio.float_to_int16(audio.resample(whole.astype(np.float32) / 32768.0, audio.RATE, rate))
                    self._return_audio(job, whole)
            if stream is not None and task.enoutput:
                self._return_audio(job, audio.float_to_int16(stream.flush()))
        except TtsError as exc:
            raise UnitError(ErrorCode.MODEL_RUN, str(exc)) from None

    @staticmethod
    def _return_audio(job: Job[TtsState], pcm: np.ndarray) -> None:
        """int16 audio at the client's rate, in base64: a stream chunk or one message (none if empty)."""
        if not pcm.size:
            return
        data = base64.b64encode(pcm.astype("<i2").tobytes()).decode("ascii")
        if job.task.stream_output:
            job.stream(data)
        else:
            job.emit(data)
