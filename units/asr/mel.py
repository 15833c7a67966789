"""Whisper's log-mel front end in numpy, bit-for-bit the recipe faster-whisper uses.

80 Slaney mel bins, n_fft 400, hop 160, periodic Hann window, centred STFT with reflect padding on the
audio plus 160 trailing zeros, last frame dropped, log10 (floor 1e-10), clamp to max - 8, (x + 4) / 4.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
N_MELS = 80


@lru_cache(maxsize=4)
def mel_filters(n_mels: int = N_MELS, sr: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filters [n_mels, n_fft/2 + 1] (librosa's defaults)."""
    fft_freqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    f_sp = 200.0 / 3  # linear part: 3 mels per 200 Hz
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    max_mel = min_log_mel + np.log(sr / 2 / min_log_hz) / logstep
    mels = np.linspace(0.0, max_mel, n_mels + 2)
    freqs = f_sp * mels
    log_part = mels >= min_log_mel
    freqs[log_part] = min_log_hz * np.exp(logstep * (mels[log_part] - min_log_mel))
    fdiff = np.diff(freqs)
    ramps = freqs[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (freqs[2:n_mels + 2] - freqs[:n_mels]))[:, None]
    weights = weights.astype(np.float32)
    weights.setflags(write=False)  # shared through the cache
    return weights


@lru_cache(maxsize=1)
def _window() -> np.ndarray:
    return np.hanning(N_FFT + 1)[:-1].astype(np.float32)


def log_mel(audio: np.ndarray, n_mels: int = N_MELS) -> np.ndarray:
    """float32 audio in [-1, 1] at 16 kHz -> normalised log-mel [n_mels, len(audio) // 160].

    One frame per 10 ms of audio, as faster-whisper keeps (`content_frames`).
    """
    audio = np.asarray(audio, dtype=np.float32)
    n_frames = len(audio) // HOP
    padded = np.pad(audio, (0, HOP))
    padded = np.pad(padded, (N_FFT // 2, N_FFT // 2), mode="reflect")
    total = 1 + (len(padded) - N_FFT) // HOP
    frames = np.lib.stride_tricks.as_strided(padded, (total, N_FFT), (HOP * padded.strides[0], padded.strides[0]))
    spectrum = np.fft.rfft(frames * _window(), axis=-1).astype(np.complex64)[:-1]
    power = (spectrum.real ** 2 + spectrum.imag ** 2).T
    mel = mel_filters(n_mels) @ power
    logs = np.log10(np.maximum(mel, 1e-10))
    logs = np.maximum(logs, logs.max() - 8.0)
    return ((logs + 4.0) / 4.0)[:, :n_frames].astype(np.float32)


def pcm_to_float(pcm: np.ndarray) -> np.ndarray:
    """int16 PCM (or float already in [-1, 1]) -> float32 in [-1, 1]."""
    pcm = np.asarray(pcm)
    if pcm.dtype == np.int16:
        return pcm.astype(np.float32) / 32768.0
    if np.issubdtype(pcm.dtype, np.floating):
        return pcm.astype(np.float32)
    raise TypeError(f"expected int16 or float PCM, got {pcm.dtype}")
