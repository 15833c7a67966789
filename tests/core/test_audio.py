"""core.audio: WAV parsing, resampling and PCM helpers."""
from __future__ import annotations

import shutil
import struct
import subprocess

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import audio
from core.audio import BadAudio, UnsupportedAudio, parse_wav, pcm_from_bytes, resample, to_wav

KSDATA_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


def make_wav(
    frames: np.ndarray,
    rate: int,
    bits: int = 16,
    fmt: str = "int",
    extensible: bool = False,
    extra_chunks: list[tuple[bytes, bytes]] | None = None,
    data_size: int | None = None,
) -> bytes:
    """A WAV file from float frames [n, channels] in [-1, 1], encoded as asked (test-side encoder)."""
    frames = np.atleast_2d(np.asarray(frames, dtype=np.float64).T).T
    n, channels = frames.shape
    if fmt == "float":
        body = frames.astype("<f4" if bits == 32 else "<f8").tobytes()
        tag = 3
    elif bits == 8:
        body = np.clip(np.round(frames * 127 + 128), 0, 255).astype(np.uint8).tobytes()
        tag = 1
    elif bits == 24:
        v = np.clip(np.round(frames * 8388607), -8388608, 8388607).astype(np.int64).reshape(-1) & 0xFFFFFF
        body = np.stack([v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF], axis=1).astype(np.uint8).tobytes()
        tag = 1
    else:
        scale = {16: 32767, 32: 2147483647}[bits]
        body = np.round(frames * scale).astype("<i2" if bits == 16 else "<i4").tobytes()
        tag = 1
    align = channels * bits // 8
    if extensible:
        fmt_body = struct.pack("<HHIIHHHHI", 0xFFFE, channels, rate, rate * align, align, bits, 22, bits, 0)
        fmt_body += struct.pack("<H", tag) + KSDATA_TAIL
    else:
        fmt_body = struct.pack("<HHIIHH", tag, channels, rate, rate * align, align, bits)
    chunks = b""
    for cid, payload in extra_chunks or []:
        chunks += cid + struct.pack("<I", len(payload)) + payload + (b"\x00" if len(payload) % 2 else b"")
    chunks += b"fmt " + struct.pack("<I", len(fmt_body)) + fmt_body
    chunks += b"data" + struct.pack("<I", len(body) if data_size is None else data_size) + body
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def tone(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return amp * np.sin(2 * np.pi * freq * t)


def dominant_freq(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * rate / len(x))


# --- round trips and exactness ------------------------------------------------------------------

def test_to_wav_parse_wav_round_trip_is_exact():
    pcm = (np.random.default_rng(0).integers(-32768, 32768, 5000)).astype(np.int16)
    wav = to_wav(pcm)
    assert wav[:4] == b"RIFF" and wav[8:16] == b"WAVEfmt " and len(wav) == 44 + 2 * pcm.size
    assert np.array_equal(parse_wav(wav), pcm)


def test_to_wav_accepts_float_and_clips():
    wav = to_wav(np.array([0.0, 0.5, 2.0, -3.0, np.nan], dtype=np.float32), rate=8000)
    assert struct.unpack_from("<I", wav, 24)[0] == 8000
    assert pcm_from_bytes(wav[44:]).tolist() == [0, 16384, 32767, -32767, 0]


def test_pcm_from_bytes():
    assert pcm_from_bytes(b"\x01\x00\xff\xff").tolist() == [1, -1]
    with pytest.raises(BadAudio):
        pcm_from_bytes(b"\x01\x00\x02")
    out = pcm_from_bytes(b"\x00\x00")
    out[0] = 5  # writable, not a view of immutable bytes


def test_float_to_int16_clips_and_handles_nan():
    got = audio.float_to_int16(np.array([1.5, -1.5, 1.0, -1.0, np.nan, np.inf, -np.inf]))
    assert got.dtype == np.int16
    assert got.tolist() == [32767, -32767, 32767, -32767, 0, 32767, -32767]


@pytest.mark.parametrize("bits,fmt,extensible", [
    (8, "int", False), (16, "int", False), (24, "int", False), (32, "int", False),
    (32, "float", False), (64, "float", False), (16, "int", True), (24, "int", True), (32, "float", True),
])
def test_every_pcm_width_decodes_to_the_same_signal(bits, fmt, extensible):
    x = tone(440, 16000, 0.25, amp=0.6)
    got = parse_wav(make_wav(x, 16000, bits, fmt, extensible)).astype(np.float64) / 32767
    tolerance = 1.5 / 127 if bits == 8 else 1e-4
    assert got.shape == x.shape
    assert np.max(np.abs(got - x)) < tolerance


def test_channels_are_averaged():
    left, right = tone(300, 16000, 0.2, 0.4), tone(300, 16000, 0.2, 0.2)
    got = parse_wav(make_wav(np.stack([left, right], axis=1), 16000)).astype(np.float64) / 32767
    assert np.max(np.abs(got - (left + right) / 2)) < 1e-3


def test_unknown_chunks_and_odd_padding_are_skipped():
    x = tone(500, 16000, 0.1)
    wav = make_wav(x, 16000, extra_chunks=[(b"LIST", b"INFOabc"), (b"junk", b"x")])  # odd sizes -> pad bytes
    assert np.max(np.abs(parse_wav(wav) / 32767 - x)) < 1e-3


def test_odd_sized_8bit_data_chunk_followed_by_a_chunk():
    body = bytes([128, 255, 0])  # 3 samples, odd size, then the pad byte and a trailing chunk
    fmt = struct.pack("<HHIIHH", 1, 1, 16000, 16000, 1, 8)
    chunks = b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", 3) + body + b"\x00"
    chunks += b"LIST" + struct.pack("<I", 4) + b"INFO"
    wav = b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks
    assert parse_wav(wav).tolist() == [0, 32511, -32767]


def test_streamed_placeholder_data_size_reads_to_the_end():
    x = tone(440, 16000, 0.1)
    wav = make_wav(x, 16000, data_size=0x7FFFF000)  # espeak-ng --stdout writes this
    assert parse_wav(wav).size == x.size


def test_real_espeak_wav_is_resampled(tmp_path):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    out = tmp_path / "a.wav"
    subprocess.run(["espeak-ng", "-w", str(out), "hello world"], check=True)
    raw = out.read_bytes()
    native, rate = audio.read_wav(raw)
    pcm = parse_wav(raw)
    assert rate == 22050
    assert abs(pcm.size - native.shape[0] * 16000 / 22050) <= 1
    assert np.abs(pcm).max() > 1000


def test_resampled_tone_keeps_its_frequency_and_duration():
    for src in (8000, 11025, 22050, 44100, 48000, 96000):
        pcm = parse_wav(make_wav(tone(1000, src, 0.5), src))
        assert abs(pcm.size - 8000) <= 1
        assert abs(dominant_freq(pcm.astype(np.float64), 16000) - 1000) < 5
        assert 0.45 < np.abs(pcm).max() / 32767 < 0.55


def test_downsampling_removes_frequencies_above_the_new_nyquist():
    x = tone(11000, 48000, 0.5, amp=0.9)  # would alias to 5 kHz if not filtered
    y = resample(x, 48000, 16000)
    assert np.sqrt(np.mean(y[1000:-1000] ** 2)) < 1e-3


def test_resample_is_aligned_and_sized():
    x = np.zeros(2205, np.float32)
    x[1000] = 1.0
    y = resample(x, 22050, 16000)
    assert y.size == 1600
    assert abs(int(np.argmax(y)) - 1000 * 16000 / 22050) <= 1
    assert resample(np.zeros(0), 22050, 16000).size == 0
    with pytest.raises(ValueError):
        resample(x, 0, 16000)


def test_resample_odd_rates():
    x = tone(200, 44101, 0.3)
    y = resample(x, 44101, 16000)
    assert abs(y.size - 0.3 * 16000) <= 2
    assert abs(dominant_freq(y, 16000) - 200) < 5


# --- rejections ---------------------------------------------------------------------------------

def test_non_pcm_codecs_are_unsupported():
    fmt = struct.pack("<HHIIHH", 0x55, 1, 16000, 2000, 1, 0)  # mp3
    chunks = b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", 4) + b"\x00" * 4
    with pytest.raises(UnsupportedAudio):
        parse_wav(b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks)
    with pytest.raises(UnsupportedAudio):
        parse_wav(b"RIFX" + b"\x00" * 4 + b"WAVE")
    with pytest.raises(UnsupportedAudio):
        parse_wav(make_wav(tone(100, 16000, 0.01), 16000, bits=16, fmt="float"))  # 16-bit float


@pytest.mark.parametrize("mutate", [
    lambda w: w[:30],  # cut inside fmt
    lambda w: w[:12],  # header only
    lambda w: b"RIFF\x00\x00\x00\x00WAVX" + w[12:],
    lambda w: w.replace(b"data", b"dat4"),  # no data chunk
    lambda w: w[:22] + b"\x00\x00" + w[24:],  # zero channels
    lambda w: w[:22] + b"\xff\x00" + w[24:],  # 255 channels
    lambda w: w[:24] + struct.pack("<I", 5) + w[28:],  # 5 Hz
    lambda w: w[:40] + struct.pack("<I", 1_000_000) + w[44:],  # data size far beyond the file
    lambda w: b"",
])
def test_malformed_files_are_bad_audio(mutate):
    with pytest.raises(BadAudio):
        parse_wav(mutate(to_wav(np.zeros(100, np.int16))))


def test_errors_are_value_errors():
    assert issubclass(BadAudio, ValueError) and issubclass(UnsupportedAudio, ValueError)


# --- property tests -----------------------------------------------------------------------------

@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_audio_errors(data):
    try:
        out = parse_wav(data)
    except (BadAudio, UnsupportedAudio):
        return
    assert out.dtype == np.int16 and out.ndim == 1


@st.composite
def riffish(draw):
    """Bytes that get past the RIFF header and into the chunk and fmt parsing."""
    tag = draw(st.sampled_from([1, 3, 0xFFFE, 2, 7, draw(st.integers(0, 0xFFFF))]))
    channels = draw(st.integers(0, 70))
    odd_rate = draw(st.integers(0, 2**32 - 1))
    rate = draw(st.sampled_from([0, 1, 999, 8000, 16000, 22050, 44101, 768000, 768001, odd_rate]))
    bits = draw(st.sampled_from([0, 4, 8, 12, 16, 24, 32, 64, draw(st.integers(0, 0xFFFF))]))
    fmt = struct.pack("<HHIIHH", tag, channels, rate, 0, 0, bits) + draw(st.binary(max_size=30))
    fmt_size = draw(st.sampled_from([len(fmt), 14, 40, 0xFFFFFFFF, draw(st.integers(0, 100))]))
    body = draw(st.binary(max_size=300))
    size = draw(st.sampled_from([len(body), 0, 0xFFFFFFFF, draw(st.integers(0, 2**32 - 1))]))
    chunks = b"fmt " + struct.pack("<I", fmt_size) + fmt + b"data" + struct.pack("<I", size) + body
    data = b"RIFF" + struct.pack("<I", len(chunks) + 4) + b"WAVE" + chunks
    cut = draw(st.integers(0, len(data)))
    return data[:cut] if draw(st.booleans()) else data


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(riffish())
def test_riff_shaped_garbage_raises_only_audio_errors(data):
    try:
        out = parse_wav(data)
    except (BadAudio, UnsupportedAudio):
        return
    assert out.dtype == np.int16 and out.ndim == 1


@settings(max_examples=60, deadline=None)
@given(
    rate=st.sampled_from([8000, 11025, 16000, 22050, 32000, 44100, 48000]) | st.integers(4000, 96000),
    channels=st.integers(1, 4),
    kind=st.sampled_from([(8, "int"), (16, "int"), (24, "int"), (32, "int"), (32, "float"), (64, "float")]),
    extensible=st.booleans(),
    seconds=st.floats(0.0, 0.2),
    freq=st.floats(100, 1000),
)
def test_valid_wavs_in_any_format_decode_to_16k_mono(rate, channels, kind, extensible, seconds, freq):
    bits, fmt = kind
    n = int(rate * seconds)
    x = 0.5 * np.sin(2 * np.pi * freq * np.arange(n) / rate)
    frames = np.stack([x] * channels, axis=1) if n else np.zeros((0, channels))
    out = parse_wav(make_wav(frames, rate, bits, fmt, extensible))
    assert out.dtype == np.int16
    assert abs(out.size - n * 16000 / rate) <= 1
    if n >= rate // 10:  # long enough for the filter edges not to matter
        mid = out[out.size // 4: 3 * out.size // 4].astype(np.float64) / 32767
        t = (np.arange(out.size) / 16000)[out.size // 4: 3 * out.size // 4]
        assert np.max(np.abs(mid - 0.5 * np.sin(2 * np.pi * freq * t))) < 0.03


def test_absurdly_long_audio_is_refused():
    fmt = struct.pack("<HHIIHH", 1, 1, 1000, 1000, 1, 8)
    body = b"\x80" * (audio.MAX_SECONDS * 1000 + 2)
    chunks = b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(body)) + body
    with pytest.raises(BadAudio):
        parse_wav(b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks)


@pytest.mark.parametrize("rates", [(22050, 16000), (16000, 48000), (44101, 16000), (16000, 16000)])
def test_resampling_in_pieces_equals_resampling_at_once(rates):
    rng = np.random.default_rng(7)
    x = rng.standard_normal(30011).astype(np.float32)
    stream = audio.Resampler(*rates)
    cuts = np.sort(rng.integers(0, x.size, 40))
    pieces = [stream.push(part) for part in np.split(x, cuts)] + [stream.flush()]
    # Samples leave as soon as their input is in: all but the filter's reach and one block before flush.
    assert sum(p.size for p in pieces[:-1]) >= resample(x, *rates).size - stream.up - 64
    np.testing.assert_allclose(np.concatenate(pieces), resample(x, *rates), atol=2e-6)
    again = np.concatenate([stream.push(x[:5000]), stream.flush()])  # flush starts a new stream
    np.testing.assert_allclose(again, resample(x[:5000], *rates), atol=2e-6)
