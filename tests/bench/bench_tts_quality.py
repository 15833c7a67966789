"""What the int8-decoder voice (`quantize: "int8"`, models/piper_int8.py) costs in quality against the float voice.

    python tests/bench/bench_tts_quality.py [--repeats 3]

Over a fixed set of sentences (none of them the int8 build's calibration texts, no numbers: Whisper writes digits):
- spectral distance: the float voice's front turns each sentence into latent frames once (timing and
  noise fixed), both decoders turn the same frames into audio, and the log-mel spectrograms (Whisper's
  80 bands at 16 kHz, units/asr/mel.py, floored 80 dB below each signal's peak) are compared: mean
  absolute difference in dB over the speech frames (within 40 dB of the sentence's loudest) and over
  the quiet ones (the pauses, where the int8 decoder's noise floor shows);
- round trip: each voice speaks each sentence as the unit does (its own random timing and timbre),
  --repeats times, and Whisper tiny.en (units/asr) transcribes it: word error rate over everything heard;
- real-time factor of each voice on the same sentences (best of the repeats), for the other side of the trade.

Prints a table; asserts nothing.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))  # the repo first: tests/units must not shadow the units package
from support import word_edit_distance  # noqa: E402

SENTENCES = [
    "Turn off the lights in the living room.",
    "The meeting has been moved to Thursday afternoon.",
    "Please remind me to water the plants tomorrow morning.",
    "It will rain later this afternoon, so take an umbrella.",
    "The train to London leaves from the north platform.",
    "My favourite colour is green, and I like to walk in the park.",
    "Set a timer for the pasta.",
    "The library opens early and closes late on Sundays.",
    "Can you play some quiet music while I read?",
    "A small robot learned to paint the sea at night.",
]
QUIET_DB = 40.0  # frames this far below the sentence's loudest are pauses


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]", " ", text.lower()).split()


def mel_db(wav: np.ndarray, rate: int) -> np.ndarray:
    """Log-mel power in dB [80, frames] of float audio, floored 80 dB below its peak."""
    from core.audio import resample
    from units.asr.mel import HOP, N_FFT, mel_filters

    audio = resample(wav.astype(np.float32), rate, 16000)
    padded = np.pad(audio, (N_FFT // 2, N_FFT // 2), mode="reflect")
    total = 1 + (len(padded) - N_FFT) // HOP
    frames = np.lib.stride_tricks.as_strided(padded, (total, N_FFT), (HOP * padded.strides[0], padded.strides[0]))
    spectrum = np.fft.rfft(frames * np.hanning(N_FFT + 1)[:-1], axis=-1)
    db = 10.0 * np.log10(np.maximum(mel_filters() @ (np.abs(spectrum) ** 2).T, 1e-12))
    return np.maximum(db, db.max() - 80.0)


def spectral_distance(ref, test) -> tuple[float, float]:
    """Mean |dB difference| of the log-mel over the speech frames and over the quiet frames, every sentence."""
    model = ref.model
    speech_diff, quiet_diff = [], []
    for sentence in SENTENCES:
        for phonemes in ref.phonemize(sentence):
            frames = model.frames(model.ids(phonemes), model.noise_scale, model.length_scale, model.noise_w)
            a = mel_db(model.decode(frames, 0, frames.shape[2]), model.rate)
            b = mel_db(test.model.decode(frames, 0, frames.shape[2]), model.rate)
            n = min(a.shape[1], b.shape[1])
            diff = np.abs(a[:, :n] - b[:, :n])
            loudness = 10.0 * np.log10(np.maximum((10.0 ** (a[:, :n] / 10.0)).sum(axis=0), 1e-12))
            quiet = loudness < loudness.max() - QUIET_DB
            speech_diff.append(diff[:, ~quiet])
            quiet_diff.append(diff[:, quiet])
    return float(np.concatenate(speech_diff, axis=1).mean()), float(np.concatenate(quiet_diff, axis=1).mean())


def round_trip(voice, asr, repeats: int) -> tuple[float, float, list[str]]:
    """WER of Whisper on the voice's speech, the best real-time factor, and one transcript per sentence."""
    silence = np.zeros(4800, np.int16)  # 0.3 s each side, as a recording would have
    errors = total = 0
    heard: list[str] = []
    best_time, audio_s = {}, {}
    for r in range(repeats):
        for sentence in SENTENCES:
            t0 = time.perf_counter()
            pcm = voice.synthesize(sentence)
            spent = time.perf_counter() - t0
            best_time[sentence] = min(spent, best_time.get(sentence, spent))
            audio_s[sentence] = pcm.size / 16000
            text = asr.transcribe(np.concatenate([silence, pcm, silence]))
            if r == 0:
                heard.append(text)
            errors += word_edit_distance(words(sentence), words(text))
            total += len(words(sentence))
    return errors / total, sum(best_time.values()) / sum(audio_s.values()), heard


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from units.asr.engine import load_asr
    from units.tts.engine import load_tts

    voices = {"float": load_tts({"threads": args.threads}), "int8": load_tts({"quantize": "int8", "threads": args.threads})}
    assert all(v.backend == "piper" and v.model.decoder is not None for v in voices.values()), "needs the split Piper voice"
    asr = load_asr({"window_pad_s": 0})  # the full 30 s window: Whisper as trained judges the voice
    speech, quiet = spectral_distance(voices["float"], voices["int8"])
    rows = {name: round_trip(voice, asr, args.repeats) for name, voice in voices.items()}
    print(f"Piper en_US-joe-medium, {len(SENTENCES)} sentences, {args.repeats} syntheses each, {args.threads} threads")
    print(f"log-mel L1, int8 decoder vs float decoder on the same frames: speech {speech:.2f} dB, "
          f"pauses (> {QUIET_DB:.0f} dB below the peak) {quiet:.2f} dB")
    print(f"{'voice':<8}{'WER':>8}{'RTF':>8}")
    for name, (wer, rtf, _) in rows.items():
        print(f"{name:<8}{wer:>8.3f}{rtf:>8.3f}")
    for sentence, a, b in zip(SENTENCES, rows["float"][2], rows["int8"][2]):
        if words(a) != words(b):
            print(f"  {sentence!r}: float heard {a!r}, int8 heard {b!r}")


if __name__ == "__main__":
    main()
