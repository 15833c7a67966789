"""The shared microphone: where capture comes from, and how units take its frames (spec §12.3, §16.7)."""
from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

from core.settings import Settings

PCM_SOURCE = "sys.pcm"  # the microphone, published by the audio unit
ASOUND_PCM = Path("/proc/asound/pcm")


def alsa_has(direction: str) -> bool:
    """Whether ALSA lists a `capture` or `playback` PCM and the matching program (arecord, aplay) is installed."""
    try:
        listing = ASOUND_PCM.read_text()
    except OSError:
        return False
    return f"{direction} " in listing and shutil.which("arecord" if direction == "capture" else "aplay") is not None


def capture_mode(settings: Settings) -> str | None:
    """The audio unit's capture source: "alsa", "wav" (audio.source_wav), "push" (clients' `capture`
    action only), or None: no microphone, so a task taking sys.pcm fails setup with -8 (spec §16.7)."""
    mode = str(settings["audio.capture"]).lower()
    if mode == "auto":
        return "alsa" if alsa_has("capture") else ("wav" if settings["audio.source_wav"] else None)
    return mode if mode in ("alsa", "wav", "push") else None


def frame_playing(response: dict[str, Any] | None) -> bool:
    """Whether the audio unit marked a sys.pcm frame as heard while the board speaks (spec §12.3)."""
    data = (response or {}).get("data")
    return isinstance(data, dict) and bool(data.get("playing"))


class PcmFeed:
    """Microphone frames waiting for a task's worker: the event loop adds, one job drains them all.

    Only one drain job is queued at a time, so a slow model gets larger batches instead of a growing
    queue, and no audio is dropped.
    """

    def __init__(self) -> None:
        self._frames: list[bytes] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def add(self, frame: bytes) -> bool:
        """Add a frame; True when the caller must queue a drain job (none is pending)."""
        with self._lock:
            self._frames.append(frame)
            if self._scheduled:
                return False
            self._scheduled = True
            return True

    def take(self) -> Any:
        """All pending audio as int16 samples; the next frame asks for a new drain job."""
        import numpy as np

        with self._lock:
            frames, self._frames = self._frames, []
            self._scheduled = False
        data = b"".join(frames)
        return np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2").astype(np.int16)

    def clear(self) -> None:
        """Drop pending frames; a drain job removed from the queue no longer blocks the next one."""
        with self._lock:
            self._frames = []
            self._scheduled = False
