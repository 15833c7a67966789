"""Token sampling, the llama2.c `run.c` way: a Sampler object owning its seeded RNG, small separate
functions for each step, pure numpy.

Order of a step (llama.cpp's default chain): logit bias -> penalties -> (temperature 0: argmax) ->
top-k -> typical -> top-p -> min-p -> temperature -> draw; Mirostat replaces the cut-offs with its
own. The cut-offs look at the untempered distribution and the temperature then reshapes what is left,
as llama.cpp and Ai00 do, so "top_p 0.9" means the same set of tokens at any temperature.

Penalties follow Ai00 (http-apis.md §4.4): each token of the history carries presence_penalty from its
first occurrence plus frequency_penalty per occurrence, and the accumulated penalty decays by
penalty_decay per step. With penalty_decay 1 that is exactly OpenAI's
`logit - presence * (count > 0) - frequency * count`. repetition_penalty is llama.cpp's (divide a
positive logit, multiply a negative one). All penalties look at the last `penalty_window` tokens of
prompt + output (0: all of them).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

import numpy as np

from core import sampling


@dataclass
class SamplerParams:
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_decay: float = 1.0
    penalty_window: int = 0  # 0: the whole history
    mirostat_tau: float = 0.0  # > 0 selects Mirostat v2
    mirostat_eta: float = 0.1
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name not in ("logit_bias", "seed"):
                setattr(self, f.name, sampling.check(f.name, getattr(self, f.name)))
        if self.seed is not None:
            self.seed = sampling.check("seed", self.seed)
        self.logit_bias = {int(k): sampling.check("logit_bias_value", v) for k, v in self.logit_bias.items()}


_FLAT_KEYS = {f.name for f in fields(SamplerParams)}


def params_from_ai00(sampler: Mapping[str, Any]) -> dict[str, Any]:
    """An Ai00 `sampler`/`sampler_override` object as SamplerParams keyword arguments."""
    kind = sampler.get("type", "Nucleus")
    if kind not in sampling.AI00_SAMPLERS:
        raise ValueError(f"sampler type {kind!r} is not one of {sorted(sampling.AI00_SAMPLERS)}")
    given = {str(k).lower(): v for k, v in sampler.items() if k != "type"}
    if "learning_rate" in given:
        given.setdefault("rate", given.pop("learning_rate"))
    if "penalty" in given:
        half_life = sampling.check("penalty_half_life", given.pop("penalty"))
        if "penalty_decay" not in given:
            given["penalty_decay"] = 0.5 ** (1.0 / half_life)  # a half-life in tokens
    values = {**sampling.AI00_SAMPLERS[kind], **given}
    unknown = set(values) - set(sampling.AI00_SAMPLERS[kind]) - {"penalty_decay"}
    if unknown:
        raise ValueError(f"{kind} sampler does not take {sorted(unknown)}")
    if kind == "Mirostat":
        return {"mirostat_tau": values["tau"], "mirostat_eta": values["rate"]}
    out = {k: values[k] for k in ("top_k", "temperature", "presence_penalty", "frequency_penalty", "penalty_decay")}
    if kind == "Nucleus":
        out["top_p"] = values["top_p"]
    else:
        # A mass above 1 (the Ai00 docs' example uses tau 5) keeps every candidate.
        out["typical_p"] = min(1.0, sampling.check("typical_tau", values["tau"]))
    return out


def params_from_request(values: Mapping[str, Any]) -> SamplerParams:
    """SamplerParams from flat request/setup keys (llm.chat_completion, spec §11.3); an Ai00 `sampler`
    object, if present, overrides the flat sampling keys it covers."""
    flat = {k: v for k, v in values.items() if k in _FLAT_KEYS and v is not None}
    if values.get("sampler"):
        flat.update(params_from_ai00(values["sampler"]))
    return SamplerParams(**flat)


# --------------------------------------------------------------------------- steps

def apply_logit_bias(logits: np.ndarray, bias: Mapping[int, float]) -> None:
    for token, value in bias.items():
        if 0 <= token < logits.shape[0]:
            logits[token] += value


def apply_penalties(logits: np.ndarray, history: Sequence[int], p: SamplerParams) -> None:
    """Repetition, presence and frequency penalties over the last `penalty_window` tokens (in place)."""
    window = np.asarray(history[-p.penalty_window:] if p.penalty_window else history, dtype=np.int64)
    if window.size == 0:
        return
    tokens, oldest = np.unique(window, return_index=True)  # oldest: index of each token's first occurrence
    if p.repetition_penalty != 1.0:
        # Dividing a positive logit and multiplying a negative one both make the token less likely.
        vals = logits[tokens]
        logits[tokens] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if p.presence_penalty == 0.0 and p.frequency_penalty == 0.0:
        return
    decay = p.penalty_decay ** np.arange(window.size, 0, -1, dtype=np.float64)  # the newest token has age 1
    frequency = np.bincount(window, weights=decay)[tokens]
    presence = decay[oldest]  # counted once, decaying from the token's first occurrence in the window
    logits[tokens] -= (p.presence_penalty * presence + p.frequency_penalty * frequency).astype(logits.dtype)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


def top_k_candidates(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits, best first. Cuts the long tail of unlikely tokens whose summed
    mass otherwise produces a nonsense token every few dozen steps."""
    k = min(k, logits.shape[0]) if k > 0 else logits.shape[0]
    if k < logits.shape[0]:
        idx = np.argpartition(-logits, k - 1)[:k]
    else:
        idx = np.arange(logits.shape[0])
    return idx[np.argsort(-logits[idx], kind="stable")]


def nucleus(logits: np.ndarray, top_p: float, min_p: float) -> np.ndarray:
    """Without top-k: the ids top-p and min-p keep over the whole vocabulary, most likely first. Grows a
    partial sort until it holds top_p of the mass instead of sorting every token (milliseconds)."""
    probs = softmax(logits.astype(np.float64))
    limit = int(np.count_nonzero(probs >= min_p * probs.max())) if min_p > 0.0 else probs.shape[0]
    k = min(256, limit)
    while True:
        idx = np.argpartition(-probs, k - 1)[:k] if k < probs.shape[0] else np.arange(k)
        idx = idx[np.argsort(-probs[idx], kind="stable")]
        mass = np.cumsum(probs[idx])
        if mass[-1] >= top_p or k >= limit:
            break
        k = min(4 * k, limit)
    return idx[:min(int(np.searchsorted(mass, top_p)) + 1, k)]


def top_p_cut(probs: np.ndarray, top_p: float) -> int:
    """How many of the (sorted, descending) probs make up top_p of the mass: nucleus sampling adapts
    the candidate count to the model's confidence, unlike a fixed k."""
    if top_p >= 1.0:
        return probs.shape[0]
    return int(np.searchsorted(np.cumsum(probs), top_p * probs.sum())) + 1


def min_p_cut(probs: np.ndarray, min_p: float) -> int:
    """How many sorted probs are at least min_p times the best one: drops tokens that are unlikely
    relative to the favourite, which stays sensible at high temperature where top-p lets junk in."""
    if min_p <= 0.0:
        return probs.shape[0]
    return max(1, int(np.count_nonzero(probs >= min_p * probs[0])))


def typical_order(probs: np.ndarray, mass: float) -> np.ndarray:
    """Locally typical sampling (Meister et al.): keep the tokens whose surprise is closest to the
    distribution's entropy until `mass` is covered. Avoids both the too-predictable head and the
    too-surprising tail. Returns positions into probs, most typical first."""
    logp = np.log(np.maximum(probs, 1e-30))
    entropy = -(probs * logp).sum()
    order = np.argsort(np.abs(-logp - entropy), kind="stable")
    keep = int(np.searchsorted(np.cumsum(probs[order]), mass * probs.sum())) + 1
    return order[:max(1, keep)]


class Sampler:
    """One generation's sampler: parameters, RNG, history for penalties, Mirostat's running target."""

    def __init__(self, params: SamplerParams | None = None, **kwargs: Any):
        self.params = params if params is not None else SamplerParams(**kwargs)
        # The stdlib generator: numpy.random would load OpenSSL (via secrets), 3 MB resident for one draw per token.
        self.rng = random.Random(self.params.seed)
        self.history: list[int] = []
        self.mu = 2.0 * self.params.mirostat_tau

    def start(self, prompt_ids: Sequence[int]) -> None:
        """A new generation after `prompt_ids` (the prompt counts for penalties, as in llama.cpp)."""
        self.history = list(prompt_ids)
        self.mu = 2.0 * self.params.mirostat_tau

    def accept(self, token: int) -> None:
        self.history.append(int(token))

    @property
    def greedy(self) -> bool:
        p = self.params
        return p.temperature == 0.0 and p.mirostat_tau == 0.0 and not self._penalized and not p.logit_bias

    @property
    def _penalized(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0

    def sample(self, logits: np.ndarray) -> int:
        """The next token for these logits (not modified). Call accept() with the token you keep."""
        p = self.params
        if self.greedy:
            return int(np.argmax(logits))
        x = np.array(logits, dtype=np.float32)
        apply_logit_bias(x, p.logit_bias)
        if self._penalized:
            apply_penalties(x, self.history, p)
        if p.temperature == 0.0:
            return int(np.argmax(x))
        if p.mirostat_tau > 0.0:
            return self._mirostat(x)
        if p.top_k == 0 and p.typical_p >= 1.0:
            if p.top_p >= 1.0 and p.min_p == 0.0:
                # No cut-off: draw from the whole distribution; the order does not matter.
                return self._draw(softmax(x.astype(np.float64) / p.temperature))
            idx = nucleus(x, p.top_p, p.min_p)
            return int(idx[self._draw(softmax(x[idx].astype(np.float64) / p.temperature))])
        idx = top_k_candidates(x, p.top_k)
        probs = softmax(x[idx].astype(np.float64))
        if p.typical_p < 1.0:
            order = typical_order(probs, p.typical_p)
            order = np.sort(order)  # back to descending probability for the cut-offs below
            idx, probs = idx[order], probs[order]
        n = min(top_p_cut(probs, p.top_p), min_p_cut(probs, p.min_p))
        idx = idx[:n]
        # Temperature reshapes only the survivors.
        tempered = softmax(x[idx].astype(np.float64) / p.temperature)
        return int(idx[self._draw(tempered)])

    def _draw(self, probs: np.ndarray) -> int:
        """Inverse-CDF draw, as run.c's sample_mult."""
        r = self.rng.random() * probs.sum()
        return min(int(np.searchsorted(np.cumsum(probs), r, side="right")), probs.shape[0] - 1)

    def _mirostat(self, x: np.ndarray) -> int:
        """Mirostat v2: keep tokens whose surprise (-log2 p) is below mu, draw, then move mu so the
        observed surprise tracks tau. Holds perplexity steady instead of fixing k or p."""
        p = self.params
        idx = np.argsort(-x, kind="stable")
        probs = softmax(x[idx].astype(np.float64) / max(p.temperature, 1e-6))
        keep = max(1, int(np.count_nonzero(-np.log2(np.maximum(probs, 1e-300)) <= self.mu)))
        kept = probs[:keep] / probs[:keep].sum()
        choice = self._draw(kept)
        surprise = -math.log2(max(kept[choice], 1e-300))
        self.mu -= p.mirostat_eta * (surprise - p.mirostat_tau)
        return int(idx[choice])
