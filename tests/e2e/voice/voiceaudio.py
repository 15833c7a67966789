"""Test speech for the voice units: espeak-ng, resampled to 16 kHz mono by sox, over low noise."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from support import espeak_pcm, trim_silence

RATE = 16000
NOISE_RMS = 30.0  # about -60 dBFS: below the asr's speech level, like a quiet room


def have_tools() -> bool:
    return bool(shutil.which("espeak-ng") and shutil.which("sox"))


def speech(text: str, folder: Path, voice: str = "en-us", speed: int = 150) -> np.ndarray:
    """int16 speech at 16 kHz with espeak-ng's leading and trailing silence trimmed."""
    return trim_silence(espeak_pcm(text, folder, voice, speed))


def scene(parts: list[np.ndarray | float], seed: int = 0) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Speech and pauses (floats, seconds) in a row over noise; returns the audio and each speech span (s)."""
    rng = np.random.default_rng(seed)
    chunks, spans, t = [], [], 0
    for part in parts:
        piece = np.zeros(int(part * RATE), np.int16) if isinstance(part, float) else part
        if not isinstance(part, float):
            spans.append((t / RATE, (t + piece.size) / RATE))
        chunks.append(piece)
        t += piece.size
    pcm = np.concatenate(chunks).astype(np.float64) + rng.normal(0.0, NOISE_RMS, t)
    return np.clip(np.rint(pcm), -32768, 32767).astype(np.int16), spans


def wav_bytes(pcm: np.ndarray) -> bytes:
    from core.audio import to_wav

    return to_wav(pcm)


def b64(data: bytes | np.ndarray) -> str:
    import base64

    raw = data.astype("<i2").tobytes() if isinstance(data, np.ndarray) else data
    return base64.b64encode(raw).decode("ascii")


def setup(client, unit: str, data: dict, request_id: str = "setup", timeout: float = 120) -> dict:
    """The setup reply (not checked: tests assert on it)."""
    return client.request({"request_id": request_id, "work_id": unit, "action": "setup", "object": f"{unit}.setup",
                           "data": data}, timeout=timeout)


def action(client, work_id: str, name: str, request_id: str = "", **fields) -> dict:
    return client.request({"request_id": request_id or name, "work_id": work_id, "action": name, **fields})


def capture(client, pcm: np.ndarray, request_id: str = "capture") -> dict:
    """Push audio into the audio unit as if the microphone heard it (played in real time)."""
    reply = action(client, "audio", "capture", request_id, object="audio.pcm.base64", data=b64(pcm))
    assert reply["error"]["code"] == 0, reply
    return reply


def outputs_until(client, done, timeout: float) -> list[dict]:
    """Messages until done(messages) is true; TimeoutError carries what came."""
    import time

    got: list[dict] = []
    end = time.monotonic() + timeout
    while not done(got):
        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"gave up after {timeout} s; got {got}")
        try:
            got.append(client.read(timeout=left))
        except TimeoutError:
            raise TimeoutError(f"gave up after {timeout} s; got {got}") from None
    return got
