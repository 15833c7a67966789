"""The converter is generic over llama GGUFs: a small synthetic model written with gguf's GGUFWriter (other
sizes, Q4_0/Q8_0/F16 weights, an untied output head, a gpt-2 pre-tokenizer) is added by a manifest
alone, and its graph agrees with the numpy reference."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from models.gguf_llama import convert_manifest
from units.llm.engine import LlmEngine, _Sequence

_spec = importlib.util.spec_from_file_location("llm_numpy_reference", Path(__file__).with_name("reference.py"))
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)

WIDTH, HEADS, KV_HEADS, FF, LAYERS, CONTEXT = 64, 4, 2, 96, 2, 128
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_vocab() -> tuple[list[str], list[str]]:
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = iter(range(256, 512))
    chars = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
    merges = ["h e", "l l", "he ll", "Ġ w"]
    merged = [m.replace(" ", "") for m in merges]
    return SPECIALS + chars + merged, merges


CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>\\n'}}{% endfor %}")


def write_model(path: Path, chat_template: str = CHAT_TEMPLATE) -> None:
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    tokens, merges = byte_vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(WIDTH)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if chat_template:
        w.add_chat_template(chat_template)

    def matrix(name: str, rows: int, cols: int, kind) -> None:
        data = (rng.standard_normal((rows, cols)) * 0.08).astype(np.float32)
        if kind == Q.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, quantize(data, kind), raw_dtype=kind)

    matrix("token_embd.weight", len(tokens), WIDTH, Q.Q8_0)
    matrix("output.weight", len(tokens), WIDTH, Q.Q4_0)
    w.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(WIDTH)).astype(np.float32))
    head = WIDTH // HEADS
    for i in range(LAYERS):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", (1 + 0.1 * rng.standard_normal(WIDTH)).astype(np.float32))
        w.add_tensor(p + "ffn_norm.weight", (1 + 0.1 * rng.standard_normal(WIDTH)).astype(np.float32))
        matrix(p + "attn_q.weight", WIDTH, WIDTH, Q.Q4_0)
        matrix(p + "attn_k.weight", KV_HEADS * head, WIDTH, Q.Q4_0)
        matrix(p + "attn_v.weight", KV_HEADS * head, WIDTH, Q.Q8_0)  # mixed types: no fusion, a Concat
        matrix(p + "attn_output.weight", WIDTH, WIDTH, Q.Q4_1)
        matrix(p + "ffn_gate.weight", FF, WIDTH, Q.Q4_1)
        matrix(p + "ffn_up.weight", FF, WIDTH, Q.Q4_1)
        matrix(p + "ffn_down.weight", WIDTH, FF, Q.F16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("tiny-llama")
    monkeypatch_module.setenv("UNITBUS_CACHE_DIR", str(root / "cache"))
    path = root / "tiny-llama.Q4_0.gguf"
    write_model(path)
    manifest = {"mode": "tiny-llama", "type": "llm", "mode_param": {"gguf": str(path)}}
    return path, convert_manifest(manifest, progress=False)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_synthetic_llama_converts_and_matches_reference(tiny):
    path, model_dir = tiny
    assert model_dir.parent.name == "cache" and model_dir.name == "tiny-llama.Q4_0"
    engine = LlmEngine(model_dir, threads=1)
    assert engine.context_length == CONTEXT and engine.config["n_kv_heads"] == KV_HEADS
    ids = engine.encode("hello world, hello!")
    assert ids[:2] == [len(SPECIALS) + 256 + 2, len(SPECIALS) + ord("o")]  # "hell" merged, then the byte "o"
    assert engine.decode(ids) == "hello world, hello!"
    ref, hidden = reference.NumpyLlama(str(path)).forward(ids)
    logits = _Sequence(engine, 64).run(ids, keep=len(ids))
    assert np.corrcoef(logits.ravel(), ref.ravel())[0, 1] >= 0.999
    assert np.corrcoef(engine.embed("hello world, hello!", layer=1), hidden[1].mean(axis=0))[0, 1] >= 0.999


def test_a_template_other_than_chatml_is_rendered_by_the_engine(tiny):
    # This template never adds the assistant turn, so it is not ChatML's: the engine renders it itself.
    _, model_dir = tiny
    engine = LlmEngine(model_dir, threads=1)
    assert engine.config["chat_format"] == "jinja"
    prompt = engine.chat_prompt([{"role": "user", "content": "hi"}], system_default="S")
    assert prompt == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


@pytest.mark.parametrize("template, reason", [
    ("", "has no chat template"),
    ("{% for m in messages %}{{ m.role }", "does not compile"),
    ("{{ raise_exception('only user turns') if messages[0].role == 'system' else 'x' }}", "only user turns"),
])
def test_a_template_that_cannot_render_is_refused_at_conversion(tmp_path, monkeypatch, template, reason):
    from models.gguf_llama import UnsupportedModel

    monkeypatch.setenv("UNITBUS_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "bad-template.Q4_0.gguf"
    write_model(path, chat_template=template)
    with pytest.raises(UnsupportedModel, match=reason):
        convert_manifest({"mode": "bad", "type": "llm", "mode_param": {"gguf": str(path)}}, progress=False)
    assert not (tmp_path / "cache" / "bad-template.Q4_0").exists()
