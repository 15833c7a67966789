"""The audio unit (spec §16.7): the microphone as `sys.pcm`, and the speaker behind `sys.play`.

A singleton without tasks. Capture runs only while some task subscribes to sys.pcm (sys tells us the
count); its source is ALSA, a WAV file or folder (audio.source_wav), or audio a client pushes with the
`capture` action. While something plays, published frames carry `{"playing": true}` so asr, whisper and
vad can ignore the board's own voice (audio.mute_capture_while_playing); kws still hears it (barge-in).
Playback takes what units publish under `sys.play` (binary PCM; `{"stop": true}` clears the queue) and
what clients send with `play`.
"""
from __future__ import annotations

import base64
import binascii
import logging
from typing import Any

from core import bus
from core.envelope import Request, Response
from core.errors import PARAMETER_FORMAT, ErrorCode, UnitError
from core.ids import ObjectType
from core.microphone import PCM_SOURCE
from core.unit import Task, Unit, decode_audio
from units.audio import UNIT, AudioSettings
from units.audio.devices import Capture, Player, capture_mode, playback_mode

log = logging.getLogger(__name__)

PLAY_SOURCE = "sys.play"
# Setup keys (spec §16.7): the Arduino form and the StackFlow audio.cap / audio.play parameter sets.
ARDUINO_KEYS = {"capcard": ("cap", "card"), "capdevice": ("cap", "device"), "capVolume": ("cap", "volume"),
                "playcard": ("play", "card"), "playdevice": ("play", "device"), "playVolume": ("play", "volume")}
STACKFLOW_KEYS = ("card", "device", "volume", "rate", "channel")


class AudioUnit(Unit[None]):
    name = UNIT.name
    names = UNIT.names
    extra_actions = ("play", "capture")
    no_task_actions = ("inference", "link", "unlink", "pause", "work", "exit")
    features = (f"sink:{PLAY_SOURCE}",)
    needs_text = False
    tasks_per_setup = False  # a setup chooses the devices (spec §16.7)

    def __init__(self, settings):
        super().__init__(settings)
        config = settings.section(UNIT.name, AudioSettings)
        self.mute = config.mute_capture_while_playing
        self.capture_mode = capture_mode(config)
        self.capture = Capture(self.capture_mode or "push", self._emit_frame, config.period_ms, config.source_wav,
                               config.loop, config.capture_device)
        self.player = Player(playback_mode(config), config.play_dir, config.playback_device)
        self.devices = {"cap": {"card": None, "device": None, "volume": 1.0},
                        "play": {"card": None, "device": None, "volume": 1.0}}
        self.listeners = 0
        log.info("capture: %s, playback: %s", self.capture_mode or "none", self.player.mode)

    async def serve(self) -> None:
        try:
            await super().serve()
        finally:
            self.capture.stop()
            self.player.close()

    # capture -----------------------------------------------------------------------------------
    def published_sources(self) -> dict[str, str]:
        if self.capture_mode is None:
            return {PCM_SOURCE: "no capture device for sys.pcm "
                                "(no ALSA capture PCM, no audio.source_wav, audio.capture is not push)"}
        return {PCM_SOURCE: ""}

    def on_subscribers(self, source: str, count: int) -> None:
        if source != PCM_SOURCE:
            return
        if count > 0 and self.listeners == 0:
            log.info("capture starts (%d listeners)", count)
            self.capture.start()
        elif count == 0 and self.listeners > 0:
            log.info("capture stops: nobody listens")
            self.capture.stop()
        self.listeners = count

    def _emit_frame(self, frame: bytes) -> None:
        """Capture thread: one period of audio to every sys.pcm subscriber."""
        playing = self.mute and self.player.playing
        self.publish(PCM_SOURCE, binary=frame, data={"playing": True} if playing else None)

    # playback ----------------------------------------------------------------------------------
    def on_sink(self, source: str, response: dict | None, binary: bytes | None) -> None:
        if source != PLAY_SOURCE:
            return
        data = (response or {}).get("data")
        if isinstance(data, dict) and data.get("stop"):
            self.player.clear()
        if binary:
            try:
                self.player.play(decode_audio("audio.pcm", binary))
            except UnitError as exc:
                log.warning("sys.play audio dropped: %s", exc.message)

    # actions -----------------------------------------------------------------------------------
    async def on_setup(self, request: Request, route: bus.Route) -> Response:
        data = request.data if isinstance(request.data, dict) else None
        if data is None:
            raise UnitError(ErrorCode.UNSUPPORTED_LINK, message=PARAMETER_FORMAT + ": setup data must be an object")
        kind = ObjectType.parse(request.object)
        changes: list[tuple[str, str, Any]] = []
        for key, value in data.items():
            if key in ARDUINO_KEYS:
                changes.append((*ARDUINO_KEYS[key], value))
            elif kind.namespace == "audio" and kind.flags & {"cap", "play"} and key in STACKFLOW_KEYS:
                changes.append(("cap" if kind.has("cap") else "play", key, value))
        for side, key, value in changes:
            self.devices[side][key] = self._checked(key, value)
        self._apply_devices()
        return Response(request.request_id, "audio")

    @staticmethod
    def _checked(key: str, value: Any) -> Any:
        def bad() -> UnitError:
            return UnitError(ErrorCode.UNSUPPORTED_LINK, message=f"{PARAMETER_FORMAT}: {key}={value!r}")

        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        if key == "volume":
            if not 0.0 <= float(value) <= 1.0:
                raise bad()
            return float(value)
        if float(value) != int(value) or int(value) < 0 or (key == "rate" and int(value) == 0):
            raise bad()
        return int(value)

    def _apply_devices(self) -> None:
        cap, play = self.devices["cap"], self.devices["play"]
        self.capture.gain = cap["volume"]
        self.player.gain = play["volume"]
        if cap["card"] is not None:
            self.capture.device = f"plughw:{cap['card']},{cap['device'] or 0}"
            if self.capture.running and self.capture_mode == "alsa":
                self.capture.stop()  # restart on the new device
                self.capture.start()
        if play["card"] is not None:
            self.player.device = f"plughw:{play['card']},{play['device'] or 0}"

    async def on_action(self, task: Task[None] | None, request: Request, route: bus.Route, binary: bytes | None) -> Response | None:
        pcm = self._audio_of(request, route, binary)
        if pcm is None:
            return None  # the middle of a chunked stream
        if request.action == "play":
            self.player.play(pcm)
            return Response(request.request_id, "audio")
        if self.listeners == 0:
            # Queued audio would otherwise be heard by whichever task subscribes next, maybe much later.
            raise UnitError(ErrorCode.NOT_AVAILABLE, "no task listens to sys.pcm")
        ahead = self.capture.push(pcm)
        return Response(request.request_id, "audio", data={"queued_s": round(ahead, 3),
                                                           "listeners": self.listeners})

    def _audio_of(self, request: Request, route: bus.Route, binary: bytes | None):
        """16 kHz int16 samples of a play/capture request (base64 WAV or PCM, chunked, or a RAW frame)."""
        kind = ObjectType.parse(request.object)
        if binary is not None:
            raw: Any = binary
        else:
            payload = request.data
            if kind.stream:
                payload = self.streams.feed((route.client, route.conn), request.action, request.data)
                if payload is None:
                    return None
            if not isinstance(payload, str) or not payload:
                raise UnitError(ErrorCode.EMPTY_DATA if payload in ("", None, "None") else ErrorCode.JSON_FORMAT)
            try:
                raw = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise UnitError(ErrorCode.BASE64_DECODING) from None
        if not raw:
            raise UnitError(ErrorCode.EMPTY_DATA)
        return decode_audio(request.object, raw)
