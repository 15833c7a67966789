"""The shared microphone as its listeners take it (spec §12.3, §16.7): the source's name, its frames'
"playing" mark, and a feed that batches frames for a task's worker. Which device captures is the
publishing unit's business (units/audio); that it exists, sys learns from the publisher's hello."""
from __future__ import annotations

import threading
from typing import Any

PCM_SOURCE = "sys.pcm"  # the microphone, as published on the bus


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
