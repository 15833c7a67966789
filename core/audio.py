"""WAV and PCM conversion shared by the audio-handling units (pure numpy + stdlib, no bus).

The wire format of unitbus audio is 16 kHz mono signed 16-bit little-endian PCM (spec §11.1).
`parse_wav` turns any PCM WAV into that; `to_wav` wraps it back into a file.
"""
from __future__ import annotations

import functools
import math
import struct
from fractions import Fraction

import numpy as np

RATE = 16000

# Rates outside this range are treated as corrupt headers: a 1 Hz "file" would make the resampler
# allocate 16000 output samples per input sample.
MIN_RATE = 1000
MAX_RATE = 768000
MAX_CHANNELS = 64
MAX_SECONDS = 3600  # longer inputs are refused rather than resampled into gigabytes

# Writers that stream a WAV before knowing its length put one of these in the data chunk size.
_PLACEHOLDER_SIZES = (0, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FFFF000)

WAVE_FORMAT_PCM = 0x0001
WAVE_FORMAT_IEEE_FLOAT = 0x0003
WAVE_FORMAT_EXTENSIBLE = 0xFFFE
# The 14 bytes after the format code in a KSDATAFORMAT_SUBTYPE_* GUID.
_KSDATAFORMAT_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


class AudioError(ValueError):
    """Base of the audio decoding errors."""


class UnsupportedAudio(AudioError):
    """Well-formed audio in an encoding unitbus does not decode (compressed codecs, odd widths)."""


class BadAudio(AudioError):
    """Malformed audio: truncated, inconsistent or absurd headers, odd-length PCM."""


def pcm_from_bytes(data: bytes) -> np.ndarray:
    """S16LE bytes -> int16 samples (a fresh, writable array)."""
    if len(data) % 2:
        raise BadAudio(f"PCM data has an odd length ({len(data)} bytes); S16LE needs 2 bytes per sample")
    return np.frombuffer(data, dtype="<i2").astype(np.int16)


def float_to_int16(x: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] -> int16 (symmetric, x 32767), clipping overshoot and mapping NaN to 0."""
    x = np.nan_to_num(np.asarray(x, dtype=np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
    out: np.ndarray = np.rint(np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)  # numpy types clip() as Any
    return out


def to_wav(pcm: np.ndarray, rate: int = RATE) -> bytes:
    """Mono samples (int16, or float in [-1, 1]) -> a 16-bit PCM WAV file."""
    pcm = np.asarray(pcm)
    if pcm.ndim != 1:
        raise ValueError(f"to_wav takes mono samples, got shape {pcm.shape}")
    if np.issubdtype(pcm.dtype, np.floating):
        pcm = float_to_int16(pcm)
    elif pcm.dtype != np.int16:
        if pcm.size and (pcm.min() < -32768 or pcm.max() > 32767):
            raise ValueError("integer samples out of int16 range")
        pcm = pcm.astype(np.int16)
    body = pcm.astype("<i2").tobytes()
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", 36 + len(body), b"WAVE",
        b"fmt ", 16, WAVE_FORMAT_PCM, 1, int(rate), int(rate) * 2, 2, 16,
        b"data", len(body),
    )
    return header + body


def _read_chunks(data: bytes) -> tuple[bytes, memoryview]:
    """The fmt chunk body and the data chunk payload of a RIFF/WAVE file."""
    if len(data) < 12:
        raise BadAudio("not a WAV file: shorter than the RIFF header")
    riff, _size, wave = struct.unpack_from("<4sI4s", data, 0)
    if riff in (b"RIFX", b"RF64", b"BW64") and wave == b"WAVE":
        raise UnsupportedAudio(f"{riff.decode()} WAV files are not supported")
    if riff != b"RIFF" or wave != b"WAVE":
        raise BadAudio("not a WAV file: no RIFF/WAVE header")
    view = memoryview(data)
    fmt: bytes | None = None
    payload: memoryview | None = None
    pos = 12
    # The RIFF size field is often wrong in streamed files, so walk the chunks to the end of the bytes.
    while pos + 8 <= len(data):
        cid, size = struct.unpack_from("<4sI", data, pos)
        body_start = pos + 8
        remaining = len(data) - body_start
        if cid == b"data":
            if payload is None:
                if size > remaining:
                    if size not in _PLACEHOLDER_SIZES:
                        raise BadAudio(f"truncated WAV: data chunk says {size} bytes, {remaining} present")
                    size = remaining
                elif size == 0 and fmt is not None and remaining > 0:
                    size = remaining  # a streamed file whose writer never came back to fix the size
                payload = view[body_start:body_start + size]
        elif size > remaining:
            if cid == b"fmt ":
                raise BadAudio("truncated WAV: fmt chunk is cut off")
            break  # a cut-off trailing chunk (LIST, id3 ...) does not matter once data is found
        elif cid == b"fmt " and fmt is None:
            fmt = bytes(view[body_start:body_start + size])
        # Chunks are word-aligned: an odd-sized chunk is followed by one pad byte.
        pos = body_start + size + (size & 1)
        if fmt is not None and payload is not None:
            break
    if fmt is None:
        raise BadAudio("WAV file has no fmt chunk")
    if payload is None:
        raise BadAudio("WAV file has no data chunk")
    return fmt, payload


def _parse_fmt(fmt: bytes) -> tuple[int, int, int, int]:
    """(format code, channels, rate, bits per sample), validated."""
    if len(fmt) < 16:
        raise BadAudio(f"fmt chunk too short ({len(fmt)} bytes)")
    tag, channels, rate, _byte_rate, _align, bits = struct.unpack_from("<HHIIHH", fmt, 0)
    if tag == WAVE_FORMAT_EXTENSIBLE:
        if len(fmt) < 40:
            raise BadAudio("WAVE_FORMAT_EXTENSIBLE fmt chunk too short")
        (sub_tag,) = struct.unpack_from("<H", fmt, 24)
        if fmt[26:40] != _KSDATAFORMAT_TAIL:
            raise UnsupportedAudio("WAVE_FORMAT_EXTENSIBLE with a non-standard sub-format GUID")
        tag = sub_tag
    if tag not in (WAVE_FORMAT_PCM, WAVE_FORMAT_IEEE_FLOAT):
        raise UnsupportedAudio(f"WAV codec 0x{tag:04x} is not PCM (only integer PCM and IEEE float are read)")
    if channels == 0:
        raise BadAudio("WAV file has zero channels")
    if channels > MAX_CHANNELS:
        raise BadAudio(f"WAV file claims {channels} channels")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise BadAudio(f"WAV sample rate {rate} Hz is outside {MIN_RATE}-{MAX_RATE} Hz")
    if tag == WAVE_FORMAT_PCM and bits not in (8, 16, 24, 32):
        raise UnsupportedAudio(f"{bits}-bit integer PCM is not supported")
    if tag == WAVE_FORMAT_IEEE_FLOAT and bits not in (32, 64):
        raise UnsupportedAudio(f"{bits}-bit float PCM is not supported")
    return tag, channels, rate, bits


def _decode_samples(payload: memoryview, tag: int, channels: int, bits: int) -> np.ndarray:
    """Interleaved payload -> float32 [frames, channels] in [-1, 1] (int16 input stays exact in int16)."""
    width = bits // 8
    frames = len(payload) // (width * channels)
    raw = payload[: frames * width * channels]  # a trailing partial frame is dropped
    if tag == WAVE_FORMAT_IEEE_FLOAT:
        x = np.frombuffer(raw, dtype="<f4" if bits == 32 else "<f8").astype(np.float32)
        x = np.clip(np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
    elif bits == 8:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif bits == 16:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif bits == 24:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        x = v.astype(np.float32) / float(1 << 23)
    else:
        x = (np.frombuffer(raw, dtype="<i4").astype(np.float64) / float(1 << 31)).astype(np.float32)
    return x.reshape(frames, channels)


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """A PCM WAV file -> (float32 samples [frames, channels] in [-1, 1], sample rate)."""
    fmt, payload = _read_chunks(data)
    tag, channels, rate, bits = _parse_fmt(fmt)
    return _decode_samples(payload, tag, channels, bits), rate


def parse_wav(data: bytes, rate: int = RATE) -> np.ndarray:
    """A PCM WAV file (any width, channel count, rate) -> int16 mono samples at `rate` Hz.

    Raises UnsupportedAudio for non-PCM codecs and BadAudio for malformed files; nothing else.
    """
    fmt, payload = _read_chunks(bytes(data))
    tag, channels, src_rate, bits = _parse_fmt(fmt)
    if tag == WAVE_FORMAT_PCM and bits == 16 and channels == 1 and src_rate == rate:
        return pcm_from_bytes(bytes(payload[: len(payload) // 2 * 2]))  # already the wire format
    seconds = len(payload) / (channels * bits // 8) / src_rate
    if seconds > MAX_SECONDS:
        raise BadAudio(f"WAV file is {seconds:.0f} s long; the limit is {MAX_SECONDS} s")
    x = _decode_samples(payload, tag, channels, bits)
    mono = x.mean(axis=1) if channels > 1 else x[:, 0]
    return float_to_int16(resample(mono, src_rate, rate))


# --- resampling ---------------------------------------------------------------------------------

_ZERO_CROSSINGS = 16  # sinc lobes kept on each side, at the lower of the two rates
_ROLLOFF = 0.94  # passband edge as a fraction of the lower Nyquist frequency
_KAISER_BETA = 8.6  # about 80 dB stop-band attenuation
_BLOCK_BUDGET = 1 << 21  # input samples per matrix product: bounds memory for long inputs
_MAX_PHASES = 2000  # larger reduced ratios (44101 -> 16000) are approximated to within ~1e-7


@functools.lru_cache(maxsize=16)
def _polyphase(up: int, down: int) -> tuple[np.ndarray, int]:
    """The resampling matrix for one block, and the offset of its input window.

    The interpolation filter h(t) lives on the up-sampled grid (rate * up); output n reads input k
    with weight h(n*down - k*up) where that argument lies within the filter's half-width. Outputs
    come in blocks of `up`, block q reading inputs q*down + offset + [0, window): so a block is one
    row of the strided input times this [window, up] matrix (a BLAS product instead of a gather).
    """
    span = max(up, down)
    half = int(math.ceil(_ZERO_CROSSINGS * span / _ROLLOFF))
    phases = np.arange(up)
    first = -((half - phases * down) // up)  # first input of output phase r: ceil((r*down - half) / up)
    offset = int(first.min())
    window = int(((phases * down + half) // up).max()) - offset + 1
    k = offset + np.arange(window)
    t = phases[None, :] * down - k[:, None] * up  # h argument, [window, up]
    cutoff = _ROLLOFF / span
    taper = np.i0(_KAISER_BETA * np.sqrt(np.clip(1.0 - (t / half) ** 2, 0.0, 1.0))) / np.i0(_KAISER_BETA)
    h = np.where(np.abs(t) <= half, up * cutoff * np.sinc(cutoff * t) * taper, 0.0)
    return h.astype(np.float32), offset


def _ratio(from_rate: int, to_rate: int) -> tuple[int, int]:
    """(up, down) with to/from = up/down, both at most _MAX_PHASES so the filter table stays small."""
    if to_rate > from_rate:
        inverse = Fraction(from_rate, to_rate).limit_denominator(_MAX_PHASES)
        return inverse.denominator, inverse.numerator
    ratio = Fraction(to_rate, from_rate).limit_denominator(_MAX_PHASES)
    return ratio.numerator, ratio.denominator


def resample(x: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Band-limited resampling (polyphase Kaiser-windowed sinc), zero phase; float32 in and out.

    The output has ceil(len(x) * to_rate / from_rate) samples and is aligned with the input
    (no filter delay). Integer input is treated as float (its scale is kept).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"resample takes a 1-D signal, got shape {x.shape}")
    stream = Resampler(from_rate, to_rate)
    if stream.same or x.size == 0:
        return x.copy()
    return np.concatenate([stream.push(x), stream.flush()])


class Resampler:
    """resample() of a signal that arrives in pieces: the outputs, concatenated, are resample() of the
    inputs concatenated (the same blocks through the same filter), and each output sample is given out
    as soon as the input its filter reads has arrived. Speech synthesised chunk by chunk goes out at the
    bus rate without clicks at the chunk edges (resampling each chunk alone pads it with zeros)."""

    def __init__(self, from_rate: int, to_rate: int) -> None:
        if from_rate <= 0 or to_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
        self.same = from_rate == to_rate
        self.up, self.down = _ratio(int(from_rate), int(to_rate))
        self.h, offset = _polyphase(self.up, self.down)
        self.window = self.h.shape[0]
        self.lead = max(0, -offset)
        self.first = offset + self.lead  # where block 0's window starts in the zero-led input
        self._start()

    def _start(self) -> None:
        self.pending = np.zeros(self.lead, np.float32)  # the zero-led input from index `base` on
        self.base = 0
        self.blocks = 0  # blocks given out
        self.received = 0

    def push(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        self.received += x.size
        if self.same:
            return x.copy()
        self.pending = np.concatenate([self.pending, x])
        return self._run(None)

    def flush(self) -> np.ndarray:
        """The last samples (the filter reads zeros beyond the end); the stream then starts over."""
        out = np.zeros(0, np.float32)
        if not self.same:
            n_out = -(-self.received * self.up // self.down)
            blocks = -(-n_out // self.up)
            if blocks > self.blocks:
                end = self.first + (blocks - 1) * self.down + self.window - self.base
                if end > self.pending.size:
                    self.pending = np.concatenate([self.pending, np.zeros(end - self.pending.size, np.float32)])
                given = self.blocks * self.up
                out = self._run(blocks)[: n_out - given]
        self._start()
        return out

    def _run(self, last: int | None) -> np.ndarray:
        """Every block whose window is in `pending` (up to block `last`, exclusive, when given)."""
        start = self.first + self.blocks * self.down - self.base  # block's window start in pending
        ready = (self.pending.size - self.window - start) // self.down + 1 if self.pending.size >= start + self.window else 0
        count = ready if last is None else min(ready, last - self.blocks)
        if count <= 0:
            return np.zeros(0, np.float32)
        rows = np.lib.stride_tricks.as_strided(
            self.pending[start:], shape=(count, self.window),
            strides=(self.down * self.pending.strides[0], self.pending.strides[0]), writeable=False)
        out = np.empty((count, self.up), np.float32)
        step = max(1, _BLOCK_BUDGET // self.window)  # bounds the copy BLAS makes of the strided rows
        for i in range(0, count, step):
            np.matmul(rows[i:i + step], self.h, out=out[i:i + step])
        self.blocks += count
        consumed = start + count * self.down  # the next block's window starts here
        self.pending = self.pending[consumed:].copy()
        self.base += consumed
        return out.reshape(-1)
