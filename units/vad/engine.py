"""Silero VAD v6 on onnxruntime: speech segments from a 16 kHz int16 stream.

The model takes [1, 64 + 512] float32 (the previous 64 samples as context, then 512 new samples), a
recurrent state [2, 1, 128] and the sample rate, and returns the speech probability of the 512 new samples
and the next state. The session is shared; each task gets its own `VadSegmenter` with its own state.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.paths import resolve_pkg_url
from core.runtime import create_session

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
WINDOW = 512  # the only window Silero v5/v6 supports at 16 kHz
CONTEXT = 64
STATE_SHAPE = (2, 1, 128)
# Hysteresis as in Silero's own iterator: speech ends only when the probability falls this far below
# the threshold, so a probability wobbling around the threshold does not split a segment.
HYSTERESIS = 0.15

DEFAULT_PARAMS: dict[str, Any] = {
    "silero_vad.model": "pkg://silero_vad/data/silero_vad.onnx",
    "silero_vad.window_size": WINDOW,
}


def _to_float(pcm: np.ndarray) -> np.ndarray:
    pcm = np.asarray(pcm)
    if pcm.dtype != np.int16:
        raise TypeError(f"vad expects int16 PCM, got {pcm.dtype}")
    return pcm.reshape(-1).astype(np.float32) * (1.0 / 32768.0)


@dataclass(frozen=True)
class VadEvent:
    speech: bool  # True: a segment started at `sample`; False: the segment ended at `sample`
    sample: int  # sample index from the segmenter's start or last reset

    @property
    def seconds(self) -> float:
        return self.sample / SAMPLE_RATE


class VadModel:
    """The shared Silero session; `segmenter()` makes per-task streaming state."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)

    def step(self, window: np.ndarray, state: np.ndarray) -> tuple[float, np.ndarray]:
        """Speech probability of one [1, 576] float32 input (context + window) and the next state."""
        prob, new_state = self._session.run(None, {"input": window, "state": state, "sr": self._sr})
        return float(prob.reshape(-1)[0]), new_state

    def probabilities(self, pcm: np.ndarray) -> np.ndarray:
        """Per-window speech probabilities of a whole int16 clip from a fresh state (the tail shorter than a
        window is ignored)."""
        audio = _to_float(pcm)
        seg = self.segmenter()
        return np.array([seg.probability(audio[i * WINDOW:(i + 1) * WINDOW]) for i in range(audio.size // WINDOW)],
                        dtype=np.float32)

    def segmenter(self, threshold: float = 0.5, min_speech_s: float = 0.25,
                  min_silence_s: float = 0.5) -> "VadSegmenter":
        if not 0.0 < float(threshold) < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        if float(min_speech_s) < 0 or float(min_silence_s) < 0:
            raise ValueError("min_speech_s and min_silence_s must be >= 0")
        return VadSegmenter(self, float(threshold), float(min_speech_s), float(min_silence_s))


class VadSegmenter:
    """Streaming speech segmentation for one task. Not thread-safe.

    Onset is reported once speech has lasted `min_speech_s` (so shorter blips never produce events); the
    event carries the sample where speech began. The end is reported after `min_silence_s` of silence and
    carries the sample where the silence began.
    """

    def __init__(self, model: VadModel, threshold: float, min_speech_s: float, min_silence_s: float) -> None:
        self._model = model
        self.threshold = threshold
        self.neg_threshold = max(threshold - HYSTERESIS, 0.01)
        self.min_speech = int(min_speech_s * SAMPLE_RATE)
        self.min_silence = int(min_silence_s * SAMPLE_RATE)
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros(STATE_SHAPE, np.float32)
        self._input = np.zeros((1, CONTEXT + WINDOW), np.float32)
        self._pending = np.empty(0, np.float32)
        self._samples = 0  # samples consumed by finished windows
        self._start: int | None = None  # candidate segment start
        self._confirmed = False  # onset reported
        self._silence_start: int | None = None
        self.last_probability = 0.0

    @property
    def in_speech(self) -> bool:
        return self._confirmed

    def feed(self, pcm: np.ndarray) -> list[VadEvent]:
        """Add 16 kHz mono int16 audio of any length; returns the events of the completed windows."""
        audio = _to_float(pcm)
        if self._pending.size:
            audio = np.concatenate((self._pending, audio))
        events: list[VadEvent] = []
        n = audio.size // WINDOW
        for i in range(n):
            self._window(audio[i * WINDOW:(i + 1) * WINDOW], events)
        self._pending = audio[n * WINDOW:].copy()
        return events

    def flush(self) -> list[VadEvent]:
        """End of stream: process the buffered tail (zero-padded), close an open segment, then reset."""
        events: list[VadEvent] = []
        if self._pending.size:
            tail = np.zeros(WINDOW, np.float32)
            tail[:self._pending.size] = self._pending
            self._window(tail, events)
            self._samples -= WINDOW - self._pending.size
        if self._confirmed:
            end = self._silence_start if self._silence_start is not None else self._samples
            events.append(VadEvent(False, end))
        self.reset()
        return events

    def probability(self, window: np.ndarray) -> float:
        """Speech probability of the next 512 float samples; advances the model state (not the segments)."""
        inp = self._input
        inp[0, :CONTEXT] = inp[0, WINDOW:]  # the previous window's last 64 samples are the context
        inp[0, CONTEXT:] = window
        prob, self._state = self._model.step(inp, self._state)
        self.last_probability = prob
        return prob

    def _window(self, window: np.ndarray, events: list[VadEvent]) -> None:
        prob = self.probability(window)
        start = self._samples
        self._samples += WINDOW
        end = self._samples

        if prob >= self.threshold:
            self._silence_start = None
            if self._start is None:
                self._start = start
            if not self._confirmed and end - self._start >= self.min_speech:
                self._confirmed = True
                events.append(VadEvent(True, self._start))
        elif prob < self.neg_threshold and self._start is not None:
            if self._silence_start is None:
                self._silence_start = start
            if end - self._silence_start >= self.min_silence:
                if self._confirmed:
                    events.append(VadEvent(False, self._silence_start))
                self._start = None
                self._confirmed = False
                self._silence_start = None


def load_vad(params: dict) -> VadModel:
    """Load Silero VAD from a flat parameter dict (manifest mode_param merged with setup).

    Keys: `silero_vad.model` (file ref: pkg://, absolute or relative path), `silero_vad.window_size`
    (must be 512 at 16 kHz), `threads` (default 1: a 2 MB recurrent graph gains nothing from a pool).
    """
    merged = {**DEFAULT_PARAMS, **{k: v for k, v in params.items() if v is not None}}
    window = int(merged["silero_vad.window_size"])
    if window != WINDOW:
        raise ValueError(f"silero_vad.window_size must be {WINDOW} at 16 kHz, got {window}")
    ref = str(merged["silero_vad.model"])
    path = resolve_pkg_url(ref) if ref.startswith("pkg://") else Path(ref)
    if not path.exists():
        raise FileNotFoundError(f"model file {ref} does not exist")
    session = create_session(path, threads=int(merged.get("threads") or 1))
    names = {i.name for i in session.get_inputs()}
    if names != {"input", "state", "sr"}:
        raise ValueError(f"{path.name} is not a Silero v5/v6 VAD (inputs {sorted(names)})")
    log.info("Silero VAD loaded from %s", path)
    return VadModel(session)
