"""The converted graph against a numpy forward pass, and the engine's generation contract."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from units.llm import engine as engine_mod
from units.llm.engine import ContextOverflow, LlmEngine, _Sequence
from units.llm.sampler import Sampler

PROMPT = "The capital of France is Paris. The capital of Germany is"


@pytest.fixture(scope="module")
def reference(gguf_path):
    import importlib.util
    from pathlib import Path

    # The suite runs with --import-mode=importlib: load the helper module next to this file by path.
    spec = importlib.util.spec_from_file_location("llm_numpy_reference", Path(__file__).with_name("reference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.NumpyLlama(str(gguf_path))


@pytest.fixture(scope="module")
def reference_run(engine, reference):
    """Reference logits and hidden states for PROMPT (one slow numpy pass shared by the tests)."""
    ids = engine.encode(PROMPT)
    return ids, *reference.forward(ids)


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def greedy(engine, prompt: str, n: int, **kw):
    gen = engine.generate(engine.encode(prompt), Sampler(temperature=0.0), n, **kw)
    deltas = list(gen)
    return gen, deltas


# --------------------------------------------------------------------------- numerics

def test_prefill_logits_match_numpy_reference(engine, reference_run):
    ids, ref, _ = reference_run
    logits = _Sequence(engine, 256).run(ids, keep=len(ids))
    assert logits.shape == (len(ids), engine.vocab_size)
    assert corr(logits, ref) >= 0.999
    assert engine.decode([int(logits[-1].argmax())]) == engine.decode([int(ref[-1].argmax())]) == " Berlin"


def test_decode_steps_use_the_cache_correctly(engine, reference_run):
    ids, ref, _ = reference_run
    seq = _Sequence(engine, 256)
    seq.prefill(ids[:-3])
    for t in ids[-3:]:
        step = np.array(seq.step(t))
    assert corr(step, ref[-1]) >= 0.999


def test_chunked_prefill_equals_one_shot(engine, monkeypatch):
    ids = engine.encode(PROMPT * 2)
    whole = np.array(_Sequence(engine, 256).prefill(ids))
    monkeypatch.setattr(engine_mod, "PREFILL_CHUNK", 5)
    chunked = np.array(_Sequence(engine, 256).prefill(ids))
    assert corr(whole, chunked) > 0.9999


def test_hidden_states_match_reference(engine, reference_run):
    _, _, hidden = reference_run
    for layer in (0, 7, engine.config["n_layers"]):
        assert corr(engine.embed(PROMPT, layer=layer), hidden[layer].mean(axis=0)) >= 0.999
    assert corr(engine.embed(PROMPT, layer=-1, pooling="last"), hidden[-1][-1]) >= 0.999
    with pytest.raises(ValueError):
        engine.embed(PROMPT, layer=99)


def test_score_ranks_the_right_answer_first(engine):
    context = "The Eiffel Tower is located in the city of"
    nll = {c: engine.score(context, c).nll for c in (" Paris", " Seattle", " Shanghai")}
    assert min(nll, key=nll.get) == " Paris"
    result = engine.score(context, " San Francisco")
    assert len(result.logprobs) == len(result.tokens) == len(engine.encode(" San Francisco"))
    assert all(lp < 0 for lp in result.logprobs)
    assert result.perplexity == pytest.approx(np.exp(result.nll))


# --------------------------------------------------------------------------- generation

def test_greedy_generation_is_deterministic_and_ends_on_eos(engine):
    prompt = engine.chat_prompt([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
    first, deltas = greedy(engine, prompt, 64)
    second, _ = greedy(engine, prompt, 64)
    assert first.tokens == second.tokens and first.text == second.text == "".join(deltas)
    assert "Paris" in first.text
    assert first.finish_reason == "stop" and len(first.tokens) < 64  # ended on <|im_end|>
    assert engine.eos_id not in first.tokens
    u = first.usage
    assert u.prompt_tokens == len(engine.encode(prompt)) and u.completion_tokens == len(first.tokens)
    assert u.prompt_ms > 0 and u.decode_ms > 0


def test_deltas_come_about_every_three_tokens(engine):
    gen, deltas = greedy(engine, "Once upon a time", 30)
    assert gen.finish_reason == "length" and len(gen.tokens) == 30
    assert 8 <= len(deltas) <= 11


def test_stop_string_is_not_emitted(engine):
    full, _ = greedy(engine, "Once upon a time", 40)
    words = full.text.split()
    stop = words[len(words) // 2]
    cut = full.text.index(stop)
    gen, deltas = greedy(engine, "Once upon a time", 40, stop=[stop, "never appears"])
    assert gen.finish_reason == "stop"
    assert "".join(deltas) == full.text[:cut]
    assert len(gen.tokens) < len(full.tokens)


def test_cancel_event_stops_generation(engine):
    cancel = threading.Event()
    gen = engine.generate(engine.encode("Once upon a time"), Sampler(temperature=0.0), 200, cancel=cancel)
    first = next(gen)
    cancel.set()
    rest = list(gen)
    assert first and gen.finish_reason == "cancelled"
    assert len(gen.tokens) <= 4 and len(rest) <= 1


def test_closing_the_iterator_cancels(engine):
    gen = engine.generate(engine.encode("Once upon a time"), Sampler(temperature=0.0), 200)
    next(gen)
    gen.close()
    assert gen.finish_reason == "cancelled"


class ScriptedSampler(Sampler):
    """Emits fixed token ids: drives the engine's text path with byte-level tokens of multi-byte text."""

    def __init__(self, ids):
        super().__init__(temperature=0.0)
        self.script = list(ids)

    def sample(self, logits):
        return self.script[len(self.history) - self.prompt_len]

    def start(self, prompt_ids):
        super().start(prompt_ids)
        self.prompt_len = len(prompt_ids)


def test_streaming_never_splits_a_utf8_character(engine):
    text = "😀 日本語 café 👨‍👩‍👧!"
    ids = engine.encode(text)
    partial = [engine.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in partial)  # some tokens really are pieces of a character
    gen = engine.generate(engine.encode("x"), ScriptedSampler(ids), len(ids))
    deltas = list(gen)
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)


def test_concurrent_generations_match_sequential(engine):
    prompts = ["Once upon a time", "The three primary colors are"]
    expected = [greedy(engine, p, 20)[0].tokens for p in prompts]
    results = [None, None]

    def work(i):
        results[i] = greedy(engine, prompts[i], 20)[0].tokens

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == expected


def test_kv_cache_growth_keeps_results(engine, monkeypatch):
    prompt = "Write a list of animals:"
    expected = greedy(engine, prompt, 40)[0].tokens
    monkeypatch.setattr(engine_mod, "KV_STEP", 16)
    assert greedy(engine, prompt, 40)[0].tokens == expected


def test_context_limit(model_dir):
    small = LlmEngine(model_dir, threads=2, context_length=24)
    with pytest.raises(ContextOverflow):
        small.generate(list(range(100, 130)), Sampler(temperature=0.0), 5)
    gen = small.generate(small.encode("Once upon a time"), Sampler(temperature=0.0), 100)
    list(gen)
    assert gen.finish_reason == "length" and len(gen.tokens) + gen.usage.prompt_tokens == 24


def test_threads_that_sleep_between_ops_decode_the_same_tokens(engine, model_dir, manifest):
    """spin: false only changes how onnxruntime's threads wait, never what the model computes."""
    from units.llm.engine import load_llm

    sleeping = load_llm({**manifest["mode_param"], "threads": 2, "spin": False})
    assert sleeping.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(RuntimeError):  # not set: onnxruntime's default, spinning
        engine.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    prompt = engine.chat_prompt([{"role": "user", "content": "Write a short poem about the sea."}])
    assert greedy(sleeping, prompt, 48)[0].tokens == greedy(engine, prompt, 48)[0].tokens


def test_load_llm_reuses_the_conversion(model_dir, manifest):
    from models.gguf_llama import convert_manifest

    before = (model_dir / "model.onnx").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert convert_manifest(manifest) == model_dir
    assert time.perf_counter() - t0 < 1.0
    assert (model_dir / "model.onnx").stat().st_mtime_ns == before


def test_a_loaded_engine_keeps_heavy_libraries_out(model_dir):
    """Resident memory: generating (sampled, seeded) loads neither the tokenizers library nor numpy.random
    (which brings OpenSSL), nor the converter's onnx and gguf."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from units.llm.engine import LlmEngine\n"
        "from units.llm.sampler import Sampler\n"
        f"e = LlmEngine({str(model_dir)!r}, threads=2)\n"
        "gen = e.generate(e.encode('Hello'), Sampler(temperature=0.8, top_p=0.9, seed=3), 4)\n"
        "assert len(list(gen)) >= 1\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tokenizers', 'onnx', 'gguf', '_hashlib')\n"
        "             or m == 'numpy.random'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(Path(__file__).resolve().parents[3]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
