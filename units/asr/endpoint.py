"""Utterance endpointing: sherpa-onnx's three rules over a stream of 16 kHz PCM chunks (spec §16.2).

Pure: feed chunks (with a speech probability from a VAD, or none to use an energy threshold) and get an
`Endpoint` when a rule fires. "Nonsilence" here means a chunk judged as speech, since Whisper cannot say
what it has recognised before the utterance ends.

- rule1: trailing silence >= 2.4 s, even if nothing was said (ends a turn where no one spoke);
- rule2: trailing silence >= 1.2 s after speech (the normal end of an utterance);
- rule3: utterance length >= 30 s (a cap: Whisper reads 30 s at most).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np


@dataclass(frozen=True)
class EndpointRule:
    """sherpa-onnx's EndpointRule: fires when every condition holds."""

    must_contain_nonsilence: bool
    min_trailing_silence: float  # seconds
    min_utterance_length: float  # seconds

    def fires(self, has_speech: bool, trailing_silence: float, length: float) -> bool:
        if self.must_contain_nonsilence and not has_speech:
            return False
        return trailing_silence >= self.min_trailing_silence and length >= self.min_utterance_length


@dataclass(frozen=True)
class EndpointConfig:
    rule1: EndpointRule = EndpointRule(False, 2.4, 0.0)
    rule2: EndpointRule = EndpointRule(True, 1.2, 0.0)
    rule3: EndpointRule = EndpointRule(False, 0.0, 30.0)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "EndpointConfig":
        """From flat keys: `endpoint_config.ruleN.<field>`, then the `rule1`/`rule2`/`rule3` shortcuts
        (what StackFlow clients send, so they win over the manifest's dotted keys)."""
        rules = {}
        for n, base in ((1, cls.rule1), (2, cls.rule2), (3, cls.rule3)):
            values = {}
            for name in ("must_contain_nonsilence", "min_trailing_silence", "min_utterance_length"):
                key = f"endpoint_config.rule{n}.{name}"
                if params.get(key) is not None:
                    values[name] = bool(params[key]) if name == "must_contain_nonsilence" else float(params[key])
            shortcut = params.get(f"rule{n}")
            if shortcut is not None:
                values["min_utterance_length" if n == 3 else "min_trailing_silence"] = float(shortcut)
            rules[f"rule{n}"] = replace(base, **values)
        return cls(**rules)


@dataclass
class Endpoint:
    """A finished segment: which rule ended it, and its audio (silence trimmed to `keep_silence_s`)."""

    rule: int
    pcm: np.ndarray
    has_speech: bool
    length: float  # seconds of stream the segment covered


@dataclass
class Endpointer:
    """Cuts a PCM stream into utterances. One per stream; not thread-safe (one feeder)."""

    config: EndpointConfig = field(default_factory=EndpointConfig)
    sample_rate: int = 16000
    speech_threshold: float = 0.5
    energy_threshold_dbfs: float = -40.0
    keep_silence_s: float = 0.4

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._chunks: list[np.ndarray] = []
        self._silent_samples = 0   # trailing silence, in samples
        self._length_samples = 0   # whole segment, in samples
        self._has_speech = False

    @property
    def has_speech(self) -> bool:
        return self._has_speech

    @property
    def trailing_silence(self) -> float:
        return self._silent_samples / self.sample_rate

    @property
    def length(self) -> float:
        return self._length_samples / self.sample_rate

    def is_speech(self, chunk: np.ndarray, speech_prob: float | None) -> bool:
        if speech_prob is not None:
            return speech_prob >= self.speech_threshold
        return chunk_dbfs(chunk) >= self.energy_threshold_dbfs

    def push(self, chunk: np.ndarray, speech_prob: float | None = None) -> Endpoint | None:
        """Add one chunk of int16 PCM; an Endpoint when a rule fires (the state is then reset)."""
        chunk = np.asarray(chunk, dtype=np.int16).reshape(-1)
        speech = self.is_speech(chunk, speech_prob)
        self._length_samples += len(chunk)
        self._chunks.append(chunk)
        if speech:
            self._has_speech = True
            self._silent_samples = 0
        else:
            self._silent_samples += len(chunk)
            if not self._has_speech:
                self._trim_leading()
        t, n = self.trailing_silence, self.length
        for number, rule in ((2, self.config.rule2), (3, self.config.rule3), (1, self.config.rule1)):
            if rule.fires(self._has_speech, t, n):
                return self._finish(number)
        return None

    def flush(self) -> Endpoint | None:
        """End of stream: the pending utterance if it has speech (rule 0: no rule fired)."""
        return self._finish(0) if self._has_speech else None

    def _keep(self) -> int:
        return int(self.keep_silence_s * self.sample_rate)

    def _trim_leading(self) -> None:
        """Before speech, only the last keep_silence_s of audio is kept, as lead-in for the utterance."""
        keep, total = self._keep(), sum(len(c) for c in self._chunks)
        while self._chunks and total - len(self._chunks[0]) >= keep:
            total -= len(self._chunks.pop(0))

    def _finish(self, rule: int) -> Endpoint:
        pcm = np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.int16)
        if self._has_speech:
            cut = max(0, self._silent_samples - self._keep())
            pcm = pcm[:len(pcm) - cut]
        else:
            pcm = pcm[:0]
        endpoint = Endpoint(rule=rule, pcm=pcm, has_speech=self._has_speech, length=self.length)
        self.reset()
        return endpoint


def chunk_dbfs(chunk: np.ndarray) -> float:
    """RMS level of int16 PCM in dB below full scale (-inf for digital silence)."""
    if len(chunk) == 0:
        return -math.inf
    rms = float(np.sqrt(np.mean(np.square(chunk.astype(np.float64)))))
    return 20.0 * math.log10(rms / 32768.0) if rms > 0 else -math.inf
