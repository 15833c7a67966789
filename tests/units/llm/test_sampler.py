"""The sampler's steps one by one, on hand-made logits (no model)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from units.llm.sampler import (Sampler, SamplerParams, apply_penalties, min_p_cut, params_from_ai00,
                               params_from_request, top_k_candidates, top_p_cut, typical_order)

LOGITS = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05], dtype=np.float32))


def draws(sampler: Sampler, logits: np.ndarray, n: int = 2000) -> np.ndarray:
    return np.bincount([sampler.sample(logits) for _ in range(n)], minlength=logits.shape[0])


def test_temperature_zero_is_argmax():
    s = Sampler(temperature=0.0)
    assert all(s.sample(LOGITS) == 0 for _ in range(20))


def test_top_k_keeps_only_the_k_best():
    assert list(top_k_candidates(LOGITS, 2)) == [0, 1]
    counts = draws(Sampler(temperature=1.0, top_k=2, seed=0), LOGITS)
    assert counts[2:].sum() == 0 and counts[0] > counts[1] > 0


def test_top_p_cuts_at_the_cumulative_mass():
    probs = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    assert top_p_cut(probs, 0.5) == 1
    assert top_p_cut(probs, 0.7) == 2  # 0.5 + 0.2 reaches 0.7
    assert top_p_cut(probs, 0.71) == 3
    counts = draws(Sampler(temperature=1.0, top_p=0.8, seed=1), LOGITS)
    assert counts[3:].sum() == 0 and counts[2] > 0


def test_min_p_is_relative_to_the_best_token():
    probs = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    assert min_p_cut(probs, 0.3) == 3  # keeps p >= 0.15
    counts = draws(Sampler(temperature=1.0, min_p=0.25, seed=2), LOGITS)
    assert counts[3:].sum() == 0 and counts[2] > 0


def test_typical_keeps_tokens_near_the_entropy():
    probs = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    entropy = -(probs * np.log(probs)).sum()  # 1.33 nats: 0.2 (1.61) and 0.15 (1.90) are the most typical
    order = typical_order(probs, 0.3)
    assert list(order) == [1, 2]
    assert abs(-math.log(0.2) - entropy) < abs(-math.log(0.5) - entropy)
    counts = draws(Sampler(temperature=1.0, typical_p=0.3, seed=3), LOGITS)
    assert counts[0] == 0 and counts[3:].sum() == 0 and counts[1] > counts[2] > 0


def test_temperature_reshapes_the_survivors():
    hot = draws(Sampler(temperature=2.0, seed=4), LOGITS, 4000) / 4000
    cold = draws(Sampler(temperature=0.5, seed=4), LOGITS, 4000) / 4000
    assert cold[0] > 0.6 > 0.5 > hot[0]
    expected = np.exp(LOGITS / 0.5) / np.exp(LOGITS / 0.5).sum()
    assert np.abs(cold - expected).max() < 0.03


def test_seed_makes_sampling_reproducible():
    s1, s2, s3 = (Sampler(temperature=1.0, seed=seed) for seed in (7, 7, 8))
    runs = [[s.sample(LOGITS) for _ in range(50)] for s in (s1, s2, s3)]
    assert runs[0] == runs[1] != runs[2]


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = np.array([2.0, -2.0, 1.0], dtype=np.float32)
    apply_penalties(logits, [0, 1], SamplerParams(repetition_penalty=2.0))
    assert list(logits) == [1.0, -4.0, 1.0]


def test_presence_and_frequency_without_decay_are_openai_penalties():
    logits = np.zeros(4, dtype=np.float32)
    apply_penalties(logits, [1, 1, 1, 2], SamplerParams(presence_penalty=0.5, frequency_penalty=0.25))
    assert np.allclose(logits, [0.0, -(0.5 + 3 * 0.25), -(0.5 + 0.25), 0.0])


def test_penalty_decay_and_window():
    p = SamplerParams(presence_penalty=1.0, frequency_penalty=1.0, penalty_decay=0.5)
    logits = np.zeros(3, dtype=np.float32)
    apply_penalties(logits, [1, 2, 1], p)  # token 1 at ages 3 and 1, token 2 at age 2
    assert np.allclose(logits, [0.0, -(0.5 ** 3 + (0.5 ** 3 + 0.5)), -(0.25 + 0.25)])
    windowed = np.zeros(3, dtype=np.float32)
    apply_penalties(windowed, [1, 2, 1], SamplerParams(presence_penalty=1.0, penalty_window=1))
    assert np.allclose(windowed, [0.0, -1.0, 0.0])


def test_penalties_change_the_greedy_choice():
    s = Sampler(temperature=0.0, presence_penalty=5.0)
    s.start([0])
    assert s.sample(LOGITS) == 1


def test_logit_bias_forces_and_bans():
    assert Sampler(temperature=0.0, logit_bias={4: 100.0}).sample(LOGITS) == 4
    counts = draws(Sampler(temperature=1.0, logit_bias={0: -1e9}, seed=5), LOGITS, 500)
    assert counts[0] == 0


def test_mirostat_tracks_the_target_surprise():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(200).astype(np.float32) * 3
    s = Sampler(temperature=1.0, mirostat_tau=3.0, mirostat_eta=0.1, seed=6)
    surprises = []
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    for _ in range(400):
        t = s.sample(logits)
        surprises.append(-math.log2(probs[t]))
    assert abs(np.mean(surprises[100:]) - 3.0) < 1.0
    assert s.mu != 6.0
    low = Sampler(temperature=1.0, mirostat_tau=0.1, seed=6)
    assert len({low.sample(logits) for _ in range(50)}) <= 2  # a tiny target leaves only the favourites


def test_ai00_sampler_objects():
    nucleus = params_from_ai00({"type": "Nucleus", "Top_P": 0.7, "penalty": 400})
    assert nucleus["top_p"] == 0.7 and nucleus["top_k"] == 128
    assert nucleus["penalty_decay"] == pytest.approx(0.5 ** (1 / 400))
    assert params_from_ai00({"type": "Nucleus", "penalty": 400, "penalty_decay": 0.99})["penalty_decay"] == 0.99
    assert params_from_ai00({"type": "Mirostat", "Rate": 0.09, "tau": 0.5}) == {"mirostat_tau": 0.5, "mirostat_eta": 0.09}
    assert params_from_ai00({"type": "Typical", "tau": 0.4})["typical_p"] == 0.4
    assert params_from_ai00({"type": "Typical", "tau": 5})["typical_p"] == 1.0  # the seed's example: keep all
    with pytest.raises(ValueError):
        params_from_ai00({"type": "Beam"})
    with pytest.raises(ValueError):
        params_from_ai00({"type": "Mirostat", "top_p": 0.5})


def test_request_params_and_validation():
    p = params_from_request({"temperature": 0.2, "top_p": 0.9, "seed": 3, "logit_bias": {"5": -1}, "unrelated": 1})
    assert (p.temperature, p.top_p, p.seed, p.logit_bias) == (0.2, 0.9, 3, {5: -1.0})
    p = params_from_request({"temperature": 0.2, "sampler": {"type": "Mirostat"}})
    assert p.mirostat_tau == 3.0 and p.temperature == 0.2
    nan, inf = float("nan"), float("inf")
    for bad in ({"temperature": -1}, {"top_p": 1.5}, {"penalty_decay": 1.5}, {"top_k": -2}, {"temperature": nan},
                {"temperature": inf}, {"presence_penalty": nan}, {"frequency_penalty": -inf}, {"top_k": 10**30},
                {"seed": 10**30}, {"top_k": 2.5}, {"top_p": True}, {"logit_bias": {1: nan}}):
        with pytest.raises(ValueError):
            SamplerParams(**bad)
    for bad in ({"type": "Typical", "tau": nan}, {"type": "Nucleus", "top_k": inf}, {"type": "Nucleus", "penalty": nan}):
        with pytest.raises(ValueError):
            params_from_request({"sampler": bad})
    # top_p 0 keeps the single most likely token, the same at every face (core/sampling.py).
    assert SamplerParams(top_p=0).top_p == 0
    assert (Sampler(SamplerParams(top_p=0.0, seed=1)).sample(np.array([0.0, 3.0, 1.0])) == 1)


def test_nucleus_without_top_k_matches_a_full_sort():
    from units.llm.sampler import nucleus

    rng = np.random.default_rng(9)
    logits = rng.standard_normal(5000).astype(np.float32) * 2
    z = logits.astype(np.float64)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    for top_p, min_p in ((0.5, 0.0), (0.95, 0.0), (0.999, 0.0), (1.0, 0.05), (0.9, 0.01)):
        n_p = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1
        n_m = int(np.count_nonzero(probs >= min_p * probs.max())) if min_p else len(probs)
        assert list(nucleus(logits, top_p, min_p)) == list(order[:min(n_p, n_m)])
