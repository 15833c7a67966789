"""Capture and playback for the audio unit: ALSA through arecord/aplay, WAV files, client pushes.

No bus here: `Capture` calls `emit(frame_bytes)` once per period from its own thread, and `Player`
plays queued int16 arrays from its own thread. Which capture source exists is `capture_mode`: the unit
publishes sys.pcm only when there is one, so a listening task's setup is refused otherwise (spec §16.7).
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from core import audio
from units.audio import AudioSettings

log = logging.getLogger(__name__)

RATE = audio.RATE
PLAY_PERIOD_S = 0.02  # playback is written and stopped in 20 ms pieces
ASOUND_PCM = Path("/proc/asound/pcm")


def alsa_has(direction: str) -> bool:
    """Whether ALSA lists a `capture` or `playback` PCM and the matching program (arecord, aplay) is installed."""
    try:
        listing = ASOUND_PCM.read_text()
    except OSError:
        return False
    return f"{direction} " in listing and shutil.which("arecord" if direction == "capture" else "aplay") is not None


def capture_mode(config: AudioSettings) -> str | None:
    """The capture source: "alsa", "wav" (audio.source_wav), "push" (clients' `capture` action only), or
    None: no microphone, so sys.pcm is not published and a task taking it fails setup with -8 (spec §16.7)."""
    mode = config.capture.lower()
    if mode == "auto":
        return "alsa" if alsa_has("capture") else ("wav" if config.source_wav else None)
    return mode if mode in ("alsa", "wav", "push") else None


def playback_mode(config: AudioSettings) -> str:
    """"alsa", "dir" (WAV files in audio.play_dir) or "none" (played silently, in real time)."""
    mode = config.playback.lower()
    if mode == "auto":
        if alsa_has("playback"):
            return "alsa"
        return "dir" if config.play_dir else "none"
    return mode if mode in ("alsa", "dir") else "none"


def apply_gain(pcm: np.ndarray, gain: float) -> np.ndarray:
    if gain == 1.0:
        return pcm
    return np.clip(np.rint(pcm.astype(np.float32) * gain), -32768, 32767).astype(np.int16)


def wav_files(path: str | Path) -> list[Path]:
    """A WAV file, or the WAV files of a folder in name order."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() == ".wav" and p.is_file())
    return [path] if path.is_file() else []


def wav_frames(path: str | Path, period: int, loop: bool) -> Iterator[np.ndarray]:
    """Frames of `period` samples from the WAV file(s); unreadable files are skipped with a warning."""
    files = wav_files(path)
    if not files:
        log.warning("audio.source_wav %s holds no WAV file", path)
        return
    for file in itertools.cycle(files) if loop else files:
        try:
            pcm = audio.parse_wav(file.read_bytes())
        except (OSError, audio.AudioError) as exc:
            log.warning("skipping %s: %s", file, exc)
            if loop and len(files) == 1:
                return
            continue
        log.info("capture: playing %s (%.1f s) as the microphone", file, pcm.size / RATE)
        for start in range(0, pcm.size, period):
            frame = pcm[start:start + period]
            if frame.size < period:
                frame = np.concatenate((frame, np.zeros(period - frame.size, np.int16)))
            yield frame


class Capture:
    """One capture thread while someone listens: every period, a pushed frame if any, else the source's.

    Sources: ALSA (arecord paces it), a WAV source or nothing (paced by the clock; silence once the
    source ends, as a microphone in a quiet room would give).
    """

    def __init__(self, mode: str, emit: Callable[[bytes], None], period_ms: int = 10,
                 source_wav: str = "", loop: bool = False, device: str = "default") -> None:
        self.mode = mode
        self.emit = emit
        self.period = max(1, RATE * int(period_ms) // 1000)
        self.source_wav = source_wav
        self.loop = loop
        self.device = device
        self.gain = 1.0
        self._pushed: collections.deque[np.ndarray] = collections.deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._pushed.clear()  # nobody listens any more: pushed audio must not reach a later listener
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
        if self._thread is not None:
            self._thread.join(5)
        self._thread = None

    def push(self, pcm: np.ndarray) -> float:
        """Queue client audio in place of the microphone; returns the seconds queued before it."""
        pcm = np.asarray(pcm, np.int16).reshape(-1)
        with self._lock:
            ahead = sum(f.size for f in self._pushed) / RATE
            for start in range(0, pcm.size, self.period):
                frame = pcm[start:start + self.period]
                if frame.size < self.period:
                    frame = np.concatenate((frame, np.zeros(self.period - frame.size, np.int16)))
                self._pushed.append(frame)
        return ahead

    def _next_pushed(self) -> np.ndarray | None:
        with self._lock:
            return self._pushed.popleft() if self._pushed else None

    def _run(self) -> None:
        source: Iterator[np.ndarray] = iter(())
        if self.mode == "wav" and self.source_wav:
            source = wav_frames(self.source_wav, self.period, self.loop)
        elif self.mode == "alsa":
            self._proc = self._open_arecord()
        silence = np.zeros(self.period, np.int16)
        deadline = time.monotonic()
        while not self._stop.is_set():
            frame = None
            if self._proc is not None:
                frame = self._read_alsa()
            else:
                deadline += self.period / RATE
                delay = deadline - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                elif delay < -0.5:
                    deadline = time.monotonic()  # far behind (machine suspended?): do not burst
            pushed = self._next_pushed()
            if pushed is not None:
                frame = pushed
            elif frame is None:
                frame = next(source, None)
                if frame is None:
                    frame = silence
            try:
                self.emit(apply_gain(frame, self.gain).astype("<i2").tobytes())
            except RuntimeError:  # the event loop closed under us: the unit is stopping
                return
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
        self._proc = None

    def _open_arecord(self) -> subprocess.Popen | None:
        argv = ["arecord", "-q", "-D", self.device, "-t", "raw", "-f", "S16_LE", "-r", str(RATE), "-c", "1",
                f"--period-size={self.period}"]
        try:
            return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        except OSError as exc:
            log.error("cannot start arecord: %s; capturing silence", exc)
            return None

    def _read_alsa(self) -> np.ndarray | None:
        assert self._proc is not None and self._proc.stdout is not None
        data = self._proc.stdout.read(self.period * 2)
        if len(data) < self.period * 2:
            log.error("arecord stopped (exit %s); capturing silence", self._proc.poll())
            self._proc = None
            return None
        return audio.pcm_from_bytes(data)


class Player:
    """A play queue served by one thread: to aplay, to WAV files in a folder, or nowhere, in real time."""

    def __init__(self, mode: str, play_dir: str = "", device: str = "default") -> None:
        self.mode = mode
        self.play_dir = Path(play_dir) if play_dir else None
        self.device = device
        self.gain = 1.0
        self._queue: collections.deque[np.ndarray] = collections.deque()
        self._cond = threading.Condition()
        self._generation = 0  # bumped by clear(): the item being played stops
        self._closed = False
        self._playing = False
        self._count = 0
        self._thread = threading.Thread(target=self._run, name="player", daemon=True)
        self._thread.start()

    @property
    def playing(self) -> bool:
        return self._playing or bool(self._queue)

    def play(self, pcm: np.ndarray) -> None:
        pcm = np.asarray(pcm, np.int16).reshape(-1)
        if not pcm.size:
            return
        with self._cond:
            self._queue.append(pcm)
            self._cond.notify()

    def clear(self) -> None:
        """Stop what is playing and drop the queue (barge-in, tts pause)."""
        with self._cond:
            self._queue.clear()
            self._generation += 1

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._generation += 1
            self._cond.notify()
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                pcm = self._queue.popleft()
                generation = self._generation
                self._playing = True
            try:
                self._play(pcm, generation)
            except Exception:
                log.exception("playback failed")
            finally:
                self._playing = False

    def _stopped(self, generation: int) -> bool:
        return self._generation != generation or self._closed

    def _next(self, generation: int) -> np.ndarray | None:
        """The next queued item if one is waiting: it continues the sound being played."""
        with self._cond:
            if self._queue and not self._stopped(generation):
                return self._queue.popleft()
        return None

    def _play(self, pcm: np.ndarray, generation: int) -> None:
        """Play `pcm` and every item queued before it ends as one sound: one aplay process, one WAV
        file (speech streamed in chunks plays without a gap at each chunk)."""
        proc = None
        if self.mode == "alsa":
            argv = ["aplay", "-q", "-D", self.device, "-t", "raw", "-f", "S16_LE", "-r", str(RATE), "-c", "1"]
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
            except OSError as exc:
                log.error("cannot start aplay: %s", exc)
        step = int(RATE * PLAY_PERIOD_S)
        start, played = time.monotonic(), 0
        heard: list[np.ndarray] = []
        wav_name = self._wav_name() if self.mode == "dir" and self.play_dir is not None else None
        item: np.ndarray | None = pcm
        while item is not None and not self._stopped(generation):
            item = apply_gain(item, self.gain)
            heard.append(item)
            if wav_name is not None:  # the file holds what has started playing, and grows with the sound
                self._write_wav(wav_name, np.concatenate(heard))
            for offset in range(0, item.size, step):
                if self._stopped(generation):
                    break
                piece = item[offset:offset + step]
                if proc is not None and proc.stdin is not None:
                    try:
                        proc.stdin.write(piece.astype("<i2").tobytes())  # aplay blocks: it paces the loop
                        continue
                    except (BrokenPipeError, OSError):
                        proc = None
                # No device paces us: keep real time so "playing" lasts as long as the sound would.
                delay = start + (played + offset + piece.size) / RATE - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            played += item.size
            item = self._next(generation)
        if proc is not None:
            if self._stopped(generation):
                proc.kill()
            else:
                try:
                    proc.stdin.close()  # type: ignore[union-attr]
                except OSError:
                    pass
            proc.wait()

    def _wav_name(self) -> str:
        self._count += 1
        return f"play-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{self._count:05d}.wav"

    def _write_wav(self, name: str, pcm: np.ndarray) -> None:
        assert self.play_dir is not None
        self.play_dir.mkdir(parents=True, exist_ok=True)
        # Written under a temporary name then renamed: a reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=self.play_dir, suffix=".part")
        with os.fdopen(fd, "wb") as f:
            f.write(audio.to_wav(pcm))
        os.replace(tmp, self.play_dir / name)
