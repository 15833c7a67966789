"""The converter's weight mapping: GGML blocks -> MatMulNBits (+ Q4_1 correction) must compute x @ W^T."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from models import gguf_llama as conv

_spec = importlib.util.spec_from_file_location("llm_numpy_reference", Path(__file__).with_name("reference.py"))
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)


class FakeTensor:
    """The parts of a GGUFReader tensor the reference dequantizer reads."""

    def __init__(self, kind: str, shape, data):
        self.tensor_type = type("T", (), {"name": kind})()
        self.shape = shape
        self.data = data


def random_blocks(kind: str, n: int, k: int, rng) -> np.ndarray:
    kb = k // 32
    if kind == "Q8_0":
        blocks = np.zeros((n, kb, 34), np.uint8)
        blocks[..., 2:] = rng.integers(0, 256, (n, kb, 32))
    else:
        size = 18 if kind == "Q4_0" else 20
        blocks = rng.integers(0, 256, (n, kb, size)).astype(np.uint8)
    d = (rng.random((n, kb)) * 0.02 + 0.001).astype(np.float16)
    blocks[..., 0:2] = d.view(np.uint8).reshape(n, kb, 2)
    if kind == "Q4_1":
        m = (-rng.random((n, kb)) * 0.1).astype(np.float16)
        blocks[..., 2:4] = m.view(np.uint8).reshape(n, kb, 2)
    return blocks.reshape(n, -1)


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.3.ffn_down.weight", "token_embd.weight"])
def test_real_tensors_dequantize_like_the_reference(gguf_reader, name):
    t = next(t for t in gguf_reader.tensors if t.name == name)
    w = conv.unpack_weight(name, int(t.tensor_type), t.shape, t.data)
    expected = reference.dequantize(t)
    got = conv.dequantize(w)
    assert got.shape == expected.shape
    assert np.allclose(got, expected, rtol=1e-6, atol=1e-6)


def run_linear(weights, x):
    from core.runtime import create_session
    from onnx import TensorProto, helper

    g = conv._Graph()
    g.linear("x", weights, "w", out="y")
    model = g.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, weights[0].k])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return create_session(model.SerializeToString(), threads=1).run(None, {"x": x})[0]


@pytest.mark.parametrize("kinds", [["Q4_0"], ["Q4_1"], ["Q8_0"], ["F16"], ["Q4_1", "Q4_1", "Q4_1"], ["Q4_1", "Q8_0"]])
def test_linear_computes_x_times_weight(kinds):
    rng = np.random.default_rng(len(kinds))
    k, x = 96, rng.standard_normal((1, 3, 96)).astype(np.float32)
    weights, dense = [], []
    for i, kind in enumerate(kinds):
        n = 16 + 8 * i
        if kind == "F16":
            data = rng.standard_normal((n, k)).astype(np.float16)
            w = conv.unpack_weight(f"w{i}", conv.F16, (k, n), data)
            dense.append(data.astype(np.float32))
        else:
            data = random_blocks(kind, n, k, rng)
            w = conv.unpack_weight(f"w{i}", {"Q4_0": conv.Q4_0, "Q4_1": conv.Q4_1, "Q8_0": conv.Q8_0}[kind], (k, n), data)
            dense.append(reference.dequantize(FakeTensor(kind, (k, n), data)))
        weights.append(w)
    expected = x @ np.concatenate(dense).T
    got = run_linear(weights, x)
    assert got.shape == expected.shape
    # accuracy_level=4 quantizes activations to int8 per block of 32; F16 runs in exact fp32.
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.9995
    assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max()


def test_unsupported_tensor_type_is_refused():
    with pytest.raises(conv.UnsupportedModel):
        conv.unpack_weight("w", 12, (256, 4), np.zeros((4, 144), np.uint8))  # Q4_K


def test_smollm2_template_is_chatml_and_renders_like_the_fast_path(gguf_path):
    from core.chat_template import PROBES, JinjaTemplate, chatml_prompt
    from models.gguf_llama import GgufFile, chat_facts, special_facts

    g = GgufFile(gguf_path)
    chat = chat_facts(g, special_facts(g))
    assert chat["chat_format"] == "chatml"
    assert chat["default_system"].startswith("You are a helpful AI assistant named SmolLM")
    template = JinjaTemplate(chat["chat_template"])
    conversations = [*PROBES, ({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},)]
    for conversation in conversations:
        assert template.render(conversation) == chatml_prompt(conversation, chat["default_system"])
