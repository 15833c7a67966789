"""One Wyoming connection: its events mapped onto the pool's tasks (asr, kws, tts, llm).

- asr: `transcribe`, audio -> `transcript-start`, `transcript-chunk`, `transcript`, `transcript-stop`. The
  model starts loading at `transcribe` (or the first audio), so it is ready when the audio stops.
- wake: `detect`, audio -> `detection` (each) / `not-detected` (at `audio-stop`). The kws unit judges each
  clip on its own, so the stream is sent as overlapping windows: every HOP_S of new audio, the audio
  since the last window plus WAKE_CONTEXT_S before it (longer than a wake word and the model's context).
- tts: `synthesize` -> `audio-start`, chunks, `audio-stop`; `synthesize-start` / `-chunk` / `-stop` are a
  text stream into the tts unit, which speaks each sentence as soon as it is complete; every chunk's
  audio is one audio-start..audio-stop, then `synthesize-stopped`.
- handle: `transcript` -> `handled-start`, `handled-chunk`..., `handled`, `handled-stop` (the llm's answer).

Failures are `error` events with a text saying what to do; the connection goes on.
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import re
from typing import TYPE_CHECKING, Any, AsyncIterator

from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.handle import Handled, HandledChunk, HandledStart, HandledStop, NotHandled
from wyoming.info import Describe
from wyoming.ping import Ping, Pong
from wyoming.server import AsyncEventHandler
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped
from wyoming.wake import Detect, Detection, NotDetected

from core.errors import ErrorCode, UnitError
from firmware_bridge.pool import PoolError
from firmware_bridge.wyoming.info import WakeWord, word_key
from firmware_bridge.wyoming.wire import BadEvent, PcmFormat, read_event

if TYPE_CHECKING:
    from firmware_bridge.wyoming.server import WyomingServer

log = logging.getLogger(__name__)

MAX_UTTERANCE_S = 300.0
HOP_S = 0.5
WAKE_CONTEXT_S = 2.0
WAKE_REFRACTORY_MS = 2000
MAX_WAKE_BACKLOG_S = 10.0
TTS_RATE = 16000  # what the tts unit returns by default (spec §16.6 audio_rate)
_TAGS = re.compile(r"<[^>]+>")
_CONNECTIONS = itertools.count(1)


class Connection(AsyncEventHandler):
    def __init__(self, server: "WyomingServer", reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        super().__init__(reader, writer)
        self.server = server
        self.pool = server.pool
        self.id = next(_CONNECTIONS)
        self._requests = itertools.count(1)
        self.mode: str | None = None  # what the next audio is for: "asr" or "wake"
        self.audio: Audio | None = None
        self.asr: Asr | None = None
        self.wake: Wake | None = None
        self.speech: Speech | None = None  # a synthesize-start stream
        self._tasks: set[asyncio.Task] = set()

    def request_id(self, kind: str) -> str:
        return f"wyoming-{kind}-{self.id}-{next(self._requests)}"

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # the event loop of the connection -----------------------------------------------------------
    async def run(self) -> None:
        try:
            while True:
                try:
                    event = await read_event(self.reader)
                except BadEvent as exc:
                    await self.fail(str(exc), "bad_event")
                    if exc.fatal:
                        break
                    continue
                if event is None:
                    break
                try:
                    await self.handle_event(event)
                except UnitError as exc:
                    await self.fail_unit(exc, event.type)
                except (KeyError, TypeError, ValueError) as exc:
                    detail = f"missing {exc.args[0]}" if isinstance(exc, KeyError) else str(exc)
                    await self.fail(f"{event.type}: {detail}", "bad_event")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:  # a bug here must cost this connection only, never the server
            log.exception("wyoming connection %d failed", self.id)
        finally:
            await self.disconnect()
            self.writer.close()

    async def disconnect(self) -> None:
        for task in list(self._tasks):
            task.cancel()  # a cancelled pool stream pauses its request on the unit

    async def fail(self, text: str, code: str) -> None:
        log.info("wyoming %d: %s (%s)", self.id, text, code)
        try:
            await self.write_event(Error(text=text, code=code).event())
        except ConnectionError:
            pass

    async def fail_unit(self, exc: UnitError, what: str) -> None:
        await self.fail(explain(exc, what), exc.code.name.lower())

    async def handle_event(self, event: Event) -> bool:
        kind = event.type
        if Describe.is_type(kind):
            await self.write_event(self.server.info().event())
        elif Ping.is_type(kind):
            await self.write_event(Pong(text=Ping.from_event(event).text).event())
        elif Transcribe.is_type(kind):
            self.start_asr(Transcribe.from_event(event))
        elif Detect.is_type(kind):
            self.start_wake(Detect.from_event(event))
        elif AudioStart.is_type(kind):
            self.audio_start(PcmFormat.of(event.data))
        elif AudioChunk.is_type(kind):
            await self.audio_chunk(PcmFormat.of(event.data), event.payload or b"")
        elif AudioStop.is_type(kind):
            await self.audio_stop()
        elif Synthesize.is_type(kind):
            if self.speech is None:  # inside a stream it only repeats the text, for older servers
                await self.synthesize(Synthesize.from_event(event))
        elif SynthesizeStart.is_type(kind):
            await self.speech_start(SynthesizeStart.from_event(event))
        elif SynthesizeChunk.is_type(kind):
            self.speech_chunk(SynthesizeChunk.from_event(event).text)
        elif SynthesizeStop.is_type(kind):
            await self.speech_stop()
        elif Transcript.is_type(kind):
            await self.handle(Transcript.from_event(event))
        else:
            log.debug("wyoming %d: ignored %s", self.id, kind)  # as the protocol asks of unknown events
        return True

    # audio -------------------------------------------------------------------------------------
    def start_asr(self, transcribe: Transcribe) -> None:
        self.mode = "asr"
        self.asr = Asr(self, transcribe.name, transcribe.language)

    def start_wake(self, detect: Detect) -> None:
        words = self.server.wake_words()
        if not words:
            raise PoolError(ErrorCode.MODEL_LOADING, message="no wake word model is installed (see sys.lsmode)")
        chosen = words
        if detect.names:
            wanted = {word_key(n) for n in detect.names if isinstance(n, str)}
            chosen = [w for w in words if word_key(w.name) in wanted or word_key(w.phrase) in wanted]
            if not chosen:
                self.mode = None
                raise PoolError(ErrorCode.MODEL_LOADING, message=f"wake word {', '.join(map(str, detect.names))} "
                                f"is not available (available: {', '.join(w.name for w in words)})")
        self.mode = "wake"
        self.wake = Wake(self, chosen)

    def audio_start(self, fmt: PcmFormat) -> None:
        if self.mode is None:
            self.start_asr(Transcribe())  # audio without a request: speech to text, as wyoming servers do
        self.audio = Audio(fmt)
        if self.mode == "asr" and self.asr is not None:
            self.asr.begin()
        elif self.mode == "wake" and self.wake is not None:
            self.wake.begin()

    async def audio_chunk(self, fmt: PcmFormat, pcm: bytes) -> None:
        if self.audio is None:
            self.audio_start(fmt)
        assert self.audio is not None
        if fmt != self.audio.fmt:
            raise ValueError(f"audio format changed within a stream ({self.audio.fmt} -> {fmt}): "
                             "send audio-stop and a new audio-start")
        if self.mode == "asr" and self.asr is not None:
            if self.audio.fmt.seconds(len(self.audio.pcm) + len(pcm)) > MAX_UTTERANCE_S:
                self.audio = None
                self.mode = None
                raise PoolError(ErrorCode.FRAME_TOO_LARGE, message=f"speech longer than {MAX_UTTERANCE_S:.0f} s; "
                                "send audio-stop sooner")
            self.audio.pcm += pcm
            await self.asr.chunk()
        elif self.mode == "wake" and self.wake is not None:
            self.audio.pcm += pcm
            self.wake.chunk(self.audio)

    async def audio_stop(self) -> None:
        audio, self.audio = self.audio, None
        mode, self.mode = self.mode, None
        if mode == "asr" and self.asr is not None:
            asr, self.asr = self.asr, None
            await asr.finish(audio)
        elif mode == "wake" and self.wake is not None:
            wake, self.wake = self.wake, None
            await wake.finish(audio)

    # text to speech ----------------------------------------------------------------------------
    async def synthesize(self, request: Synthesize) -> None:
        served = await self.server.acquire("tts", request.voice.name if request.voice else None,
                                           request.voice.language if request.voice else None)
        text = speakable(request.text, request.text_format)
        if not text:
            raise PoolError(ErrorCode.EMPTY_DATA, message="synthesize: the text is empty")
        speaker = AudioWriter(self)
        async for item in self.pool.stream(served, text, self.request_id("tts"), "tts.utf-8"):
            await speaker.write(item)
        await speaker.close(always=True)

    async def speech_start(self, start: SynthesizeStart) -> None:
        if self.speech is not None:
            self.speech.abandon()
        voice = start.voice
        served = await self.server.acquire("tts", voice.name if voice else None, voice.language if voice else None)
        self.speech = Speech(self, served, start.text_format)

    def speech_chunk(self, text: str) -> None:
        if self.speech is None:
            raise ValueError("synthesize-chunk without synthesize-start")
        self.speech.send(text, finish=False)

    async def speech_stop(self) -> None:
        speech, self.speech = self.speech, None
        if speech is None:
            raise ValueError("synthesize-stop without synthesize-start")
        speech.send("", finish=True)
        await speech.done()

    # conversation ------------------------------------------------------------------------------
    async def handle(self, transcript: Transcript) -> None:
        text = (transcript.text or "").strip()
        if not text:
            await self.write_event(NotHandled(text="nothing to answer: the transcript is empty",
                                              context=transcript.context).event())
            return
        served = await self.server.acquire("llm", self.server.settings["wyoming.handle_model"] or None)
        messages = [{"role": "user", "content": text}]
        if self.server.settings["wyoming.handle_prompt"]:
            messages.insert(0, {"role": "system", "content": self.server.settings["wyoming.handle_prompt"]})
        data = {"messages": messages, "max_tokens": int(self.server.settings["wyoming.handle_max_tokens"])}
        answer: list[str] = []
        started = False
        async for item in self.pool.stream(served, data, self.request_id("llm"), "llm.chat_completion"):
            delta = item.get("delta") if isinstance(item, dict) else item
            if not isinstance(delta, str) or not delta:
                continue
            if not started:
                await self.write_event(HandledStart(context=transcript.context).event())
                started = True
            answer.append(delta)
            await self.write_event(HandledChunk(text=delta).event())
        if not started:
            await self.write_event(HandledStart(context=transcript.context).event())
        await self.write_event(Handled(text="".join(answer).strip(), context=transcript.context).event())
        await self.write_event(HandledStop().event())


class Audio:
    """One audio-start..audio-stop stream in the client's format."""

    def __init__(self, fmt: PcmFormat):
        self.fmt = fmt
        self.pcm = bytearray()
        self.dropped = 0  # bytes cut from the front (wake keeps only a window), for timestamps


class Asr:
    """One transcription: the model loads while the audio arrives; the text follows audio-stop."""

    def __init__(self, conn: Connection, name: str | None, language: str | None):
        self.conn = conn
        self.language = language
        self.load = conn.spawn(conn.server.acquire("asr", name, language))
        self.load.add_done_callback(lambda t: t.cancelled() or t.exception())  # reported at audio-stop
        self.streaming = False

    def begin(self) -> None:
        self.streaming = False

    async def chunk(self) -> None:
        if not self.streaming:
            self.streaming = True
            await self.conn.write_event(TranscriptStart(language="en").event())

    async def finish(self, audio: Audio | None) -> None:
        conn = self.conn
        if not self.streaming:
            await conn.write_event(TranscriptStart(language="en").event())
        text = ""
        try:
            if audio is not None and audio.pcm:
                served = await self.load
                wav = base64.b64encode(audio.fmt.wav(bytes(audio.pcm))).decode("ascii")
                answer = await conn.pool.call(served, "asr.wav.base64", wav, conn.request_id("asr"))
                texts = [(item.get("delta") if isinstance(item, dict) else item) for item in answer]
                text = " ".join(t.strip() for t in texts if isinstance(t, str) and t.strip())
        finally:
            if not self.load.done():
                self.load.cancel()  # only the wait: the load goes on in the pool
        if text:
            await conn.write_event(TranscriptChunk(text=text).event())
        await conn.write_event(Transcript(text=text, language="en").event())
        await conn.write_event(TranscriptStop().event())


class Wake:
    """Wake word detection on a live stream, as overlapping clips for the kws unit."""

    def __init__(self, conn: Connection, words: list[WakeWord]):
        self.conn = conn
        self.words = words
        self.keys = {word_key(w.name): w for w in words}
        self.load = conn.spawn(conn.server.acquire("kws", words[0].model))
        self.load.add_done_callback(lambda t: t.cancelled() or t.exception())
        self.begin()

    def begin(self) -> None:
        self.sent = 0  # bytes of the stream already in a clip
        self.running: asyncio.Task | None = None
        self.detected = False
        self.last_ms: int | None = None
        self.failed = False

    def chunk(self, audio: Audio) -> None:
        fmt = audio.fmt
        behind = audio.dropped + len(audio.pcm) - self.sent
        if behind > fmt.bytes_for(MAX_WAKE_BACKLOG_S):
            # The kws unit cannot keep up (or is still loading): judge the newest audio, not a growing past.
            log.warning("wyoming %d: kws is %.1f s behind; skipping to the newest audio", self.conn.id,
                        fmt.seconds(behind))
            self.sent = audio.dropped + len(audio.pcm) - fmt.bytes_for(HOP_S)
            cut = max(0, len(audio.pcm) - fmt.bytes_for(WAKE_CONTEXT_S + HOP_S))
            del audio.pcm[:cut]
            audio.dropped += cut
        if self.running is None or self.running.done():
            if fmt.seconds(audio.dropped + len(audio.pcm) - self.sent) >= HOP_S:
                self.running = self.conn.spawn(self.clip(audio))

    def _take(self, audio: Audio) -> tuple[bytes, int]:
        """The audio not yet judged plus WAKE_CONTEXT_S before it, and its start in ms of the stream."""
        fmt = audio.fmt
        end = audio.dropped + len(audio.pcm)
        start = max(audio.dropped, self.sent - fmt.bytes_for(WAKE_CONTEXT_S))
        clip = bytes(audio.pcm[start - audio.dropped:])
        self.sent = end
        # Keep only what the next clip can still need.
        keep_from = max(audio.dropped, end - fmt.bytes_for(WAKE_CONTEXT_S))
        del audio.pcm[: keep_from - audio.dropped]
        audio.dropped = keep_from
        return clip, int(fmt.seconds(start) * 1000)

    async def clip(self, audio: Audio) -> None:
        clip, start_ms = self._take(audio)
        conn = self.conn
        try:
            served = await self.load
            wav = base64.b64encode(audio.fmt.wav(clip)).decode("ascii")
            async for item in conn.pool.stream(served, wav, conn.request_id("kws"), "kws.wav.base64"):
                await self._detection(item, start_ms)
        except UnitError as exc:
            if not self.failed:  # one error per stream, not one per clip
                self.failed = True
                await conn.fail_unit(exc, "detect")

    async def _detection(self, item: Any, start_ms: int) -> None:
        try:
            found = json.loads(item) if isinstance(item, str) else item
            keyword, at_ms = str(found["keyword"]), start_ms + int(found["timestamp_ms"])
        except (ValueError, KeyError, TypeError):
            log.warning("kws answered %r, not a kws.json detection", item)
            return
        word = self.keys.get(word_key(keyword))
        if word is None:
            return  # a wake word this client did not ask for
        if self.last_ms is not None and at_ms - self.last_ms < WAKE_REFRACTORY_MS:
            return  # the same wake, seen again in the overlap of the next clip
        self.last_ms = at_ms
        self.detected = True
        await self.conn.write_event(Detection(name=word.name, timestamp=at_ms).event())

    async def finish(self, audio: Audio | None) -> None:
        if self.running is not None:
            await asyncio.gather(self.running, return_exceptions=True)
        if audio is not None and audio.dropped + len(audio.pcm) > self.sent:
            await self.clip(audio)
        if not self.load.done():
            self.load.cancel()
        if not self.detected and not self.failed:  # after an error event, that error is the answer
            await self.conn.write_event(NotDetected().event())


class AudioWriter:
    """Unit audio (base64 PCM outputs) as one audio-start, audio-chunks, audio-stop."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.started = False
        self.timestamp_ms = 0

    async def write(self, item: Any) -> None:
        data = item.get("delta") if isinstance(item, dict) else item
        if not isinstance(data, str) or not data:
            return
        pcm = base64.b64decode(data)
        if not self.started:
            self.started = True
            await self.conn.write_event(AudioStart(rate=TTS_RATE, width=2, channels=1,
                                                   timestamp=self.timestamp_ms).event())
        await self.conn.write_event(AudioChunk(rate=TTS_RATE, width=2, channels=1, audio=pcm,
                                               timestamp=self.timestamp_ms).event())
        self.timestamp_ms += len(pcm) * 1000 // (2 * TTS_RATE)

    async def close(self, always: bool = False) -> None:
        if always and not self.started:
            await self.conn.write_event(AudioStart(rate=TTS_RATE, width=2, channels=1, timestamp=0).event())
            self.started = True
        if self.started:
            await self.conn.write_event(AudioStop(timestamp=self.timestamp_ms).event())
            self.started = False


class Speech:
    """A synthesize-start stream: each chunk goes to the tts unit at once (its text completes sentences
    there); the audio of each chunk is written in order, as soon as it comes."""

    def __init__(self, conn: Connection, served: Any, text_format: Any):
        self.conn = conn
        self.served = served
        self.text_format = text_format
        self.request_id = conn.request_id("tts")
        self.index = 0
        self.outputs: asyncio.Queue = asyncio.Queue()  # one asyncio.Queue of outputs per chunk, in order
        self.writer = conn.spawn(self._write())
        self.pumps: list[asyncio.Task] = []
        self.failed = False

    def send(self, text: str, finish: bool) -> None:
        if self.failed:
            return  # the error event went out; the rest of this text is not spoken
        chunk = {"delta": speakable(text, self.text_format, strip=False), "index": self.index, "finish": finish}
        self.index += 1
        queue: asyncio.Queue = asyncio.Queue()
        source = self.conn.pool.stream(self.served, chunk, self.request_id, "tts.utf-8.stream")
        self.pumps.append(self.conn.spawn(_pump(source, queue)))
        self.outputs.put_nowait(queue)
        if finish:
            self.outputs.put_nowait(None)

    async def _write(self) -> None:
        conn = self.conn
        try:
            while (queue := await self.outputs.get()) is not None:
                speaker = AudioWriter(conn)
                while (item := await queue.get()) is not _END:
                    if isinstance(item, UnitError):
                        raise item
                    await speaker.write(item)
                await speaker.close()
            await conn.write_event(SynthesizeStopped().event())
        except UnitError as exc:
            self.failed = True
            self.abandon()
            await conn.fail_unit(exc, "synthesize")

    async def done(self) -> None:
        await asyncio.gather(self.writer, return_exceptions=True)

    def abandon(self) -> None:
        for pump in self.pumps:
            pump.cancel()
        if not self.writer.done() and asyncio.current_task() is not self.writer:
            self.writer.cancel()


_END = object()


async def _pump(source: AsyncIterator[Any], queue: asyncio.Queue) -> None:
    try:
        async for item in source:
            queue.put_nowait(item)
    except UnitError as exc:
        queue.put_nowait(exc)
    finally:
        queue.put_nowait(_END)


def speakable(text: Any, text_format: Any = None, strip: bool = True) -> str:
    if not isinstance(text, str):
        raise TypeError("text must be a string")
    if str(getattr(text_format, "value", text_format) or "text") == "ssml":
        text = _TAGS.sub(" ", text)  # the voice reads text: SSML markup is dropped, its words kept
    return text.strip() if strip else text


def explain(exc: UnitError, what: str) -> str:
    """A pool failure in words a person can act on."""
    unit = {"transcribe": "asr", "audio-stop": "asr", "audio-chunk": "asr", "detect": "kws",
            "synthesize": "tts", "synthesize-start": "tts", "synthesize-chunk": "tts", "synthesize-stop": "tts",
            "transcript": "llm"}.get(what, "unit")
    code, message = exc.code, exc.message
    retry = getattr(exc, "retry_after", None)
    if code == ErrorCode.UNIT_NOT_EXIST:
        return f"{what}: {message}; add it to up.units (or start unitbus-unit@{unit}) and try again"
    if code == ErrorCode.TASK_FULL:
        return (f"{what}: every {unit} task is taken ({unit}.max_tasks), by the HTTP gateway, a StackFlow client "
                f"or a microphone pipeline; raise {unit}.max_tasks or stop one ({message})")
    if code == ErrorCode.QUEUE_FULL:
        return f"{what}: the {unit} unit is busy; retry in {round(retry or 1)} s ({message})"
    if code == ErrorCode.UNIT_CALL:
        return f"{what}: {message}; is unitbus up running, with the {unit} unit?"
    if code == ErrorCode.RESOURCE_ALLOCATION:
        return f"{what}: {message}; free memory or unload other models"
    return f"{what}: {message}"

