"""Reading Wyoming events without trusting them, and client audio as WAV for the units.

The `wyoming` package's reader ends the connection on any malformed line (it returns None, as at EOF);
this one reports what was wrong so the connection can answer an `error` event and go on.
"""
from __future__ import annotations

import asyncio
import io
import json
import wave
from dataclasses import dataclass

from wyoming.event import Event

MAX_DATA_BYTES = 1 << 20  # the JSON data of one event
MAX_PAYLOAD_BYTES = 16 << 20  # one audio chunk
MIN_RATE, MAX_RATE = 1000, 768000
MAX_CHANNELS = 64


class BadEvent(Exception):
    """An event that cannot be used. `fatal` when the stream cannot be resynchronised after it."""

    def __init__(self, text: str, fatal: bool = False):
        super().__init__(text)
        self.fatal = fatal


async def read_event(reader: asyncio.StreamReader) -> Event | None:
    """The next event; None at the end of the stream; BadEvent for a malformed one."""
    try:
        line = await reader.readline()
    except ValueError:  # the stream's line limit: the rest of the line arrives as the next "line"
        raise BadEvent("event header line too long") from None
    if not line:
        return None
    if not line.strip():
        raise BadEvent("empty event header line")
    try:
        header = json.loads(line)
    except ValueError as exc:
        raise BadEvent(f"event header is not JSON ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str) or not header["type"]:
        raise BadEvent("an event header is a JSON object with a string `type`")
    data_length = _length(header, "data_length", MAX_DATA_BYTES)
    payload_length = _length(header, "payload_length", MAX_PAYLOAD_BYTES)
    data = header.get("data") or {}
    try:
        extra = await reader.readexactly(data_length) if data_length else b""
        payload = await reader.readexactly(payload_length) if payload_length else None
    except asyncio.IncompleteReadError:
        return None
    if not isinstance(data, dict):
        raise BadEvent(f"{header['type']}: `data` must be a JSON object")
    if extra:
        try:
            more = json.loads(extra)
        except ValueError as exc:
            raise BadEvent(f"{header['type']}: event data is not JSON ({exc})") from None
        if not isinstance(more, dict):
            raise BadEvent(f"{header['type']}: event data must be a JSON object")
        data = {**data, **more}
    return Event(type=header["type"], data=data, payload=payload)


def _length(header: dict, key: str, limit: int) -> int:
    value = header.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadEvent(f"{key} must be a non-negative integer", fatal=True)
    if value > limit:
        raise BadEvent(f"{key} {value} is over the limit of {limit} bytes", fatal=True)
    return value


@dataclass(frozen=True)
class PcmFormat:
    rate: int
    width: int  # bytes per sample
    channels: int

    @classmethod
    def of(cls, data: dict) -> "PcmFormat":
        """The format of an audio-start or audio-chunk event; ValueError names what is wrong."""
        try:
            fmt = cls(int(data["rate"]), int(data["width"]), int(data["channels"]))
        except KeyError as exc:
            raise ValueError(f"audio format needs rate, width and channels (missing {exc.args[0]})") from None
        except (TypeError, ValueError):
            raise ValueError("audio rate, width and channels must be integers") from None
        if not MIN_RATE <= fmt.rate <= MAX_RATE:
            raise ValueError(f"audio rate {fmt.rate} Hz is outside {MIN_RATE}..{MAX_RATE}")
        if fmt.width not in (1, 2, 3, 4):
            raise ValueError(f"audio width {fmt.width} is not 1, 2, 3 or 4 bytes")
        if not 1 <= fmt.channels <= MAX_CHANNELS:
            raise ValueError(f"audio channels {fmt.channels} is outside 1..{MAX_CHANNELS}")
        return fmt

    @property
    def frame_bytes(self) -> int:
        return self.width * self.channels

    def bytes_for(self, seconds: float) -> int:
        return int(seconds * self.rate) * self.frame_bytes

    def seconds(self, size: int) -> float:
        return size / self.frame_bytes / self.rate

    def wav(self, pcm: bytes) -> bytes:
        """Raw interleaved little-endian PCM as a WAV file, which the units convert to what they take."""
        pcm = pcm[: len(pcm) // self.frame_bytes * self.frame_bytes]
        if self.width == 1:
            pcm = bytes(b ^ 0x80 for b in pcm)  # Wyoming's 8-bit samples are signed, WAV's unsigned
        out = io.BytesIO()
        with wave.open(out, "wb") as w:
            w.setnchannels(self.channels)
            w.setsampwidth(self.width)
            w.setframerate(self.rate)
            w.writeframes(pcm)
        return out.getvalue()
