"""The log-mel front end against a frame-by-frame numpy reference written from Whisper's recipe."""
from __future__ import annotations

import numpy as np
import pytest

from units.asr.mel import log_mel, mel_filters, pcm_to_float


def _hz_to_mel(f: float) -> float:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    return f / (200.0 / 3) if f < 1000 else 15.0 + np.log(f / 1000.0) / (np.log(6.4) / 27.0)


def _mel_to_hz(m: float) -> float:
    return m * 200.0 / 3 if m < 15.0 else 1000.0 * np.exp((m - 15.0) * np.log(6.4) / 27.0)


def reference_filters(n_mels=80, sr=16000, n_fft=400) -> np.ndarray:
    edges = [_mel_to_hz(m) for m in np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2), n_mels + 2)]
    bins = np.arange(n_fft // 2 + 1) * sr / n_fft
    out = np.zeros((n_mels, len(bins)))
    for i in range(n_mels):
        lo, mid, hi = edges[i], edges[i + 1], edges[i + 2]
        for j, f in enumerate(bins):
            if lo < f <= mid:
                out[i, j] = (f - lo) / (mid - lo)
            elif mid < f < hi:
                out[i, j] = (hi - f) / (hi - mid)
        out[i] *= 2.0 / (hi - lo)  # Slaney normalisation: equal area per band
    return out


def reference_log_mel(audio: np.ndarray) -> np.ndarray:
    n_fft, hop = 400, 160
    x = np.concatenate([audio.astype(np.float64), np.zeros(hop)])
    x = np.pad(x, n_fft // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    filters = reference_filters()
    frames = []
    for start in range(0, len(x) - n_fft + 1, hop):
        spectrum = np.fft.rfft(x[start:start + n_fft] * window)
        frames.append(filters @ np.abs(spectrum) ** 2)
    mel = np.array(frames[:-1]).T  # the last frame is dropped, as Whisper does
    logs = np.log10(np.maximum(mel, 1e-10))
    logs = np.maximum(logs, logs.max() - 8.0)
    return ((logs + 4.0) / 4.0)[:, :len(audio) // hop]


def test_filters_match_reference():
    np.testing.assert_allclose(mel_filters(), reference_filters(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("seconds", [0.5, 1.73, 3.0])
def test_log_mel_matches_reference(seconds):
    rng = np.random.default_rng(7)
    t = np.arange(int(seconds * 16000)) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 440 * t) * np.sin(2 * np.pi * 3 * t) + 0.02 * rng.standard_normal(len(t))).astype(np.float32)
    ours = log_mel(audio)
    assert ours.shape == (80, len(audio) // 160)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference_log_mel(audio), atol=2e-4)


def test_log_mel_of_silence_is_the_floor():
    ours = log_mel(np.zeros(16000, dtype=np.float32))
    np.testing.assert_allclose(ours, (np.log10(1e-10) + 4.0) / 4.0, atol=1e-6)


def test_pcm_to_float():
    np.testing.assert_allclose(pcm_to_float(np.array([-32768, 0, 16384], dtype=np.int16)), [-1.0, 0.0, 0.5])
    with pytest.raises(TypeError):
        pcm_to_float(np.array([1, 2], dtype=np.int32))
