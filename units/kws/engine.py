"""openWakeWord 0.5.1 keyword spotting on onnxruntime, without the openwakeword package.

Pipeline per 1280-sample (80 ms) step of 16 kHz int16 audio, as the reference library does it:
`melspectrogram.onnx` on the last 1760 samples gives 8 frames (scaled x/10 + 2), the last 76 mel frames go
through `embedding_model.onnx` to one 96-d embedding, and each keyword head scores the last 16 (or however
many it takes) embeddings. The embedding model runs as its streaming rewrite (`stream_graph`): it takes only
the 8 new frames and carries convolution caches, giving the same embeddings for a fraction of the work.
Sessions and the noise warm-up are shared by all detectors of one `KwsModel`; each detector (one per task)
keeps only its own small state.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from core.paths import resolve_pkg_url
from core.runtime import create_session

from models import openwakeword_stream as stream_graph

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
STEP_SAMPLES = 1280  # 80 ms: one embedding per step
MEL_CONTEXT = 480  # 3 hops of 160: a 1760-sample window yields exactly 8 new mel frames
MEL_FRAMES_PER_STEP = 8
MEL_BINS = 32
EMBEDDING_DIM = 96
WARMUP_SECONDS = 4
WARMUP_AMPLITUDE = 1000  # the reference library warms up on randint(-1000, 1000) noise
WARMUP_SEED = 0
DEFAULT_KEYWORD = "HEY JARVIS"
FLUSH_STEPS = 6  # silence after a clip: the heads fire up to about 0.3 s after a phrase ends

DEFAULT_PARAMS: dict[str, Any] = {
    "melspectrogram_model": "pkg://openwakeword/resources/models/melspectrogram.onnx",
    "embedding_model": "pkg://openwakeword/resources/models/embedding_model.onnx",
    # Folder scanned for keyword heads when "keyword_models" is not given.
    "keyword_dir": "pkg://openwakeword/resources/models",
}

_VERSION_SUFFIX = re.compile(r"[\s_-]*v\d+(?:\.\d+)*$", re.IGNORECASE)
_SEPARATORS = re.compile(r"[\s_-]+")
# Files next to the heads that are not heads.
_NOT_HEADS = {"melspectrogram", "embedding_model", "silero_vad"}


@dataclass(frozen=True)
class Detection:
    keyword: str  # display name, e.g. "HEY JARVIS"
    score: float
    timestamp_ms: int  # end of the step that fired, counted from the detector's start or reset


def display_name(head: str) -> str:
    """`hey_jarvis_v0.1` -> `HEY JARVIS`."""
    stem = _VERSION_SUFFIX.sub("", head.strip())
    return " ".join(part for part in _SEPARATORS.split(stem) if part).upper()


def _match_key(text: str) -> str:
    """Comparison key: case, spaces, `_`, `-` and a version suffix do not matter."""
    return _SEPARATORS.sub("", _VERSION_SUFFIX.sub("", text.strip())).lower()


def resolve_keywords(
    requested: str | Sequence[str] | None,
    available: Iterable[str],
    default: str = DEFAULT_KEYWORD,
) -> tuple[list[str], str | None]:
    """Match requested wake words to available head names (spec §16.4).

    `requested` is a string or a list (commas inside separate words too); `available` holds head names
    (`hey_jarvis_v0.1`) or display names. Returns the matching entries of `available` in request order
    without duplicates, and a note for the setup reply when a word had no head (None when all matched).
    When nothing matches, `default` is used instead; a `default` that matches nothing raises ValueError.
    An empty request means the default, with no note.
    """
    available = list(available)
    by_key: dict[str, str] = {}
    for name in available:
        by_key.setdefault(_match_key(name), name)
    listing = ", ".join(sorted({display_name(name) for name in available}))

    if requested is None:
        requested = []
    elif isinstance(requested, str):
        requested = [requested]
    words = [word.strip() for entry in requested for word in str(entry).split(",") if word.strip()]

    names: list[str] = []
    missing: list[str] = []
    for word in words:
        name = by_key.get(_match_key(word))
        if name is None:
            missing.append(word)
        elif name not in names:
            names.append(name)

    note = None
    if not names:
        fallback = by_key.get(_match_key(default))
        if fallback is None:
            raise ValueError(f"default keyword {default} is not available (available: {listing})")
        names = [fallback]
        if missing:
            note = (f"keyword {', '.join(missing)} not available, using {display_name(fallback)} "
                    f"(available: {listing})")
    elif missing:
        note = f"keyword {', '.join(missing)} not available (available: {listing})"
    return names, note


def _resolve_file(ref: str | Path) -> Path:
    ref = str(ref)
    path = resolve_pkg_url(ref) if ref.startswith("pkg://") else Path(ref)
    if not path.exists():
        raise FileNotFoundError(f"model file {ref} does not exist")
    return path


class _Head:
    """One keyword head: a session that maps [1, frames, 96] embeddings to one score."""

    def __init__(self, name: str, session: Any) -> None:
        self.name = name
        self.display = display_name(name)
        self.session = session
        inp = session.get_inputs()[0]
        self.input_name = inp.name
        self.frames = int(inp.shape[1])


def _is_single_score_head(session: Any) -> bool:
    """Wake-word heads take [1, n, 96] and give [1, 1]; multi-class intent heads (timer) are not wake words."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        return False
    ishape, oshape = inputs[0].shape, outputs[0].shape
    return (len(ishape) == 3 and ishape[2] == EMBEDDING_DIM and isinstance(ishape[1], int)
            and list(oshape) == [1, 1])


@dataclass
class _StreamState:
    """What one stream carries between steps: audio tail for the mel window, embedding-graph caches and
    the recent embeddings the heads read."""

    tail: np.ndarray  # last MEL_CONTEXT samples, float32
    caches: list[np.ndarray]
    embeddings: np.ndarray  # [history, 96]

    def copy(self) -> "_StreamState":
        return _StreamState(self.tail.copy(), [c.copy() for c in self.caches], self.embeddings.copy())


class KwsModel:
    """Shared openWakeWord sessions; `detector()` makes a per-task streaming detector."""

    def __init__(self, mel_session: Any, embedding_session: Any, caches: list[tuple[str, str, tuple[int, ...]]],
                 heads: dict[str, _Head]) -> None:
        if not heads:
            raise ValueError("no keyword heads were loaded")
        self._mel = mel_session
        self._mel_input = mel_session.get_inputs()[0].name
        self._emb = embedding_session
        self._cache_inputs = [name for name, _, _ in caches]
        self._cache_shapes = [shape for _, _, shape in caches]
        self.heads = heads
        self.history = max(head.frames for head in heads.values())
        self._by_display = {head.display: head for head in heads.values()}
        self._warm = self._warm_up()

    @property
    def keywords(self) -> list[str]:
        """Display names of the loaded heads, sorted: ["ALEXA", "HEY JARVIS", ...]."""
        return sorted(self._by_display)

    def head_for(self, keyword: str) -> _Head:
        """The head for a head name or display text (same matching as `resolve_keywords`); KeyError if none."""
        key = _match_key(keyword)
        for head in self.heads.values():
            if _match_key(head.name) == key:
                return head
        raise KeyError(f"keyword {keyword} not available (available: {', '.join(self.keywords)})")

    def mel(self, window: np.ndarray) -> np.ndarray:
        """Scaled mel frames [n, 32] of float32 audio [1, samples] (per-call dB floor, as the model defines)."""
        out = self._mel.run(None, {self._mel_input: window})[0]
        return out.reshape(-1, out.shape[-1]) / 10.0 + 2.0

    def advance(self, state: _StreamState, audio: np.ndarray) -> np.ndarray:
        """Run whole steps of float32 audio (length a multiple of 1280) through the front end, updating
        `state`; returns the new embeddings [steps, 96]."""
        steps = audio.size // STEP_SAMPLES
        stream = np.concatenate((state.tail, audio))[None, :]
        state.tail = stream[0, -MEL_CONTEXT:].copy()
        frames = np.empty((1, 1, steps * MEL_FRAMES_PER_STEP, MEL_BINS), np.float32)
        for i in range(steps):
            # One mel call per step: the model's dB floor is relative to the loudest frame of its input,
            # so one call over several steps would change the features.
            start = i * STEP_SAMPLES
            frames[0, 0, i * MEL_FRAMES_PER_STEP:(i + 1) * MEL_FRAMES_PER_STEP] = \
                self.mel(stream[:, start:start + STEP_SAMPLES + MEL_CONTEXT])
        feeds = dict(zip(self._cache_inputs, state.caches))
        feeds[stream_graph.INPUT] = frames
        out = self._emb.run(None, feeds)
        state.caches = out[1:]
        return out[0]

    def _warm_up(self) -> _StreamState:
        """The stream state after a few seconds of low noise.

        A zero-filled embedding buffer gave false alarms up to 0.98 in the first second (MODELS.md); the
        reference library starts from embeddings of random noise, so does this (seeded: reproducible). The
        zero caches of the first steps are long out of reach of the kept embeddings by the end.
        """
        rng = np.random.default_rng(WARMUP_SEED)
        noise = rng.integers(-WARMUP_AMPLITUDE, WARMUP_AMPLITUDE, SAMPLE_RATE * WARMUP_SECONDS)
        state = _StreamState(np.zeros(MEL_CONTEXT, np.float32),
                             [np.zeros(shape, np.float32) for shape in self._cache_shapes],
                             np.zeros((0, EMBEDDING_DIM), np.float32))
        embeddings = self.advance(state, noise.astype(np.float32))
        state.embeddings = np.ascontiguousarray(embeddings[-self.history:])
        return state

    def detector(self, keywords: Sequence[str], threshold: float = 0.5,
                 refractory_ms: int = 2000, phases: int = 1) -> "KwsDetector":
        """A streaming detector for `keywords` (head names or display text; unknown ones raise KeyError),
        scoring on `phases` staggered 80 ms grids (KwsDetector)."""
        if isinstance(keywords, str):
            keywords = [keywords]
        heads: list[_Head] = []
        for word in keywords:
            head = self.head_for(word)
            if head not in heads:
                heads.append(head)
        if not heads:
            raise ValueError("a detector needs at least one keyword")
        if not 0.0 < float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if int(refractory_ms) < 0:
            raise ValueError(f"refractory_ms must be >= 0, got {refractory_ms}")
        if isinstance(phases, bool) or not isinstance(phases, int) or phases not in (1, 2, 4):
            raise ValueError(f"phases must be 1, 2 or 4, got {phases!r}")
        return KwsDetector(self, heads, float(threshold), int(refractory_ms), phases)


@dataclass
class _Grid:
    """One front end on its own 80 ms grid, `shift` samples after the stream's start."""

    shift: int
    state: _StreamState
    skip: int  # samples of the stream's start still to drop: the grid starts at `shift`
    pending: np.ndarray  # samples of a step not yet complete
    samples: int = 0  # samples consumed by this grid's finished steps


class KwsDetector:
    """Per-task streaming state. Not thread-safe; one task feeds it from one thread.

    The reference pipeline scores once per 80 ms step, so a wake is reported up to a step after its score
    rose. `phases` front ends run the same pipeline on grids staggered by 80/phases ms and any of them may
    fire: each grid's scores are the reference algorithm's on the audio from its shift, and the wake comes
    at the first grid's step that crosses the threshold (2 grids: median wake delay 109 ms instead of
    151 ms on 16 "hey jarvis" clips, for 6 ms more CPU per second of audio)."""

    # Steps run through the embedding graph per call when a long chunk arrives: bounds the work array.
    _MAX_STEPS_PER_CALL = 64

    def __init__(self, model: KwsModel, heads: list[_Head], threshold: float, refractory_ms: int,
                 phases: int = 1) -> None:
        self._model = model
        self._heads = heads
        self.keywords = [head.display for head in heads]
        self.threshold = threshold
        self.refractory_ms = refractory_ms
        self.phases = phases
        self._emb_buf = np.empty((model.history + self._MAX_STEPS_PER_CALL, EMBEDDING_DIM), np.float32)
        self.reset()

    def reset(self) -> None:
        """Back to the warmed-up start: buffers, pending audio, clock and refractory period."""
        shifts = [i * STEP_SAMPLES // self.phases for i in range(self.phases)]
        self._grids = [_Grid(shift, self._model._warm.copy(), shift, np.empty(0, np.float32)) for shift in shifts]
        self._last_wake_ms: int | None = None
        self.max_scores = {head.display: 0.0 for head in self._heads}

    def feed(self, pcm: np.ndarray) -> list[Detection]:
        """Add 16 kHz mono int16 audio of any length; returns the wakes found in the completed steps."""
        pcm = np.asarray(pcm)
        if pcm.dtype != np.int16:
            raise TypeError(f"kws expects int16 PCM, got {pcm.dtype}")
        audio = pcm.reshape(-1).astype(np.float32)
        scores: list[tuple[int, int, float]] = []  # (time ms, head index, score) of every finished step
        for grid in self._grids:
            scores += self._advance(grid, audio)
        # Every grid's steps in this call end after those of earlier calls: in time order, the refractory
        # period holds across grids.
        scores.sort(key=lambda entry: entry[0])
        detections: list[Detection] = []
        for now_ms, index, score in scores:
            head = self._heads[index]
            if score > self.max_scores[head.display]:
                self.max_scores[head.display] = score
            if score < self.threshold:
                continue
            if self._last_wake_ms is not None and now_ms - self._last_wake_ms < self.refractory_ms:
                continue
            self._last_wake_ms = now_ms
            detections.append(Detection(head.display, score, now_ms))
            log.debug("wake %s score %.3f at %d ms", head.display, score, now_ms)
        return detections

    def flush(self) -> list[Detection]:
        """End of input (a whole clip, not a live stream): score the partial step and a short stretch of
        silence after it, so a wake word that ends the clip is still detected. The clock keeps running."""
        pad = (-self._grids[0].pending.size) % STEP_SAMPLES + FLUSH_STEPS * STEP_SAMPLES
        return self.feed(np.zeros(pad, np.int16))

    def _advance(self, grid: _Grid, audio: np.ndarray) -> list[tuple[int, int, float]]:
        if grid.skip:
            dropped = min(grid.skip, audio.size)
            grid.skip -= dropped
            audio = audio[dropped:]
        if grid.pending.size:
            audio = np.concatenate((grid.pending, audio))
        steps = audio.size // STEP_SAMPLES
        scores: list[tuple[int, int, float]] = []
        for first in range(0, steps, self._MAX_STEPS_PER_CALL):
            count = min(self._MAX_STEPS_PER_CALL, steps - first)
            block = audio[first * STEP_SAMPLES:(first + count) * STEP_SAMPLES]
            scores += self._score(grid, self._model.advance(grid.state, block))
        grid.pending = audio[steps * STEP_SAMPLES:].copy()
        return scores

    def _score(self, grid: _Grid, embeddings: np.ndarray) -> list[tuple[int, int, float]]:
        history = self._model.history
        buf = self._emb_buf
        buf[:history] = grid.state.embeddings
        buf[history:history + len(embeddings)] = embeddings
        scores: list[tuple[int, int, float]] = []
        for i in range(len(embeddings)):
            end = history + i + 1
            grid.samples += STEP_SAMPLES
            now_ms = (grid.shift + grid.samples) * 1000 // SAMPLE_RATE
            for index, head in enumerate(self._heads):
                score = float(head.session.run(None, {head.input_name: buf[None, end - head.frames:end]})[0]
                              .reshape(-1)[0])
                scores.append((now_ms, index, score))
        grid.state.embeddings = buf[len(embeddings):history + len(embeddings)].copy()
        return scores


def _head_files(params: dict) -> list[Path]:
    refs = params.get("keyword_models")
    if refs:
        if isinstance(refs, str):
            refs = [ref for ref in refs.split(",") if ref.strip()]
        return [_resolve_file(ref.strip()) for ref in refs]
    folder = _resolve_file(params.get("keyword_dir", DEFAULT_PARAMS["keyword_dir"]))
    return sorted(p for p in folder.glob("*.onnx") if p.stem not in _NOT_HEADS)


def load_kws(params: dict) -> KwsModel:
    """Load the shared openWakeWord model from a flat parameter dict (manifest mode_param merged with setup).

    Keys: `melspectrogram_model`, `embedding_model` (file refs: pkg://, absolute or relative paths),
    `keyword_models` (list of head files; default: every single-score head in `keyword_dir`),
    `threads` (onnxruntime intra-op threads, default 1: these graphs are too small to gain from a pool).
    """
    merged = {**DEFAULT_PARAMS, **{k: v for k, v in params.items() if v is not None}}
    threads = int(merged.get("threads") or 1)
    # No onnxruntime pool: these graphs' tensors are small, and the pool's chunks (23 MB resident for the
    # embedding graph, whose 1.3 MB of weights came as bytes) cost more than the allocations they save.
    mel = create_session(_resolve_file(merged["melspectrogram_model"]), threads=threads, arena=False)
    graph, caches = stream_graph.cached_build(_resolve_file(merged["embedding_model"]))
    emb = create_session(graph, threads=threads, arena=False)
    explicit = bool(merged.get("keyword_models"))
    heads: dict[str, _Head] = {}
    for path in _head_files(merged):
        session = create_session(path, threads=1, arena=False)
        if not _is_single_score_head(session):
            if explicit:
                raise ValueError(f"{path.name} is not a single-score wake word head")
            log.debug("skipping %s: not a single-score wake word head", path.name)
            continue
        heads[path.stem] = _Head(path.stem, session)
    model = KwsModel(mel, emb, caches, heads)
    log.info("openWakeWord loaded: %s", ", ".join(model.keywords))
    return model
