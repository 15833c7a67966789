"""The exact rewrite of the float voice's upsampling (models/piper_fast.py): same output, cached once."""
from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from core.runtime import create_session  # noqa: E402
from units.tts import engine  # noqa: E402
from models.piper_fast import fast_voice, rewrite_conv_transposes  # noqa: E402


def conv_transpose_model(cin: int, cout: int, kernel: int, stride: int, pads: list[int], bias: bool, seed: int):
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((cin, cout, kernel)).astype(np.float32), "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "b"))
        inputs.append("b")
    node = helper.make_node("ConvTranspose", inputs, ["y"], name="/dec/ups.0/ConvTranspose",
                            kernel_shape=[kernel], strides=[stride], pads=pads)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, None])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)


@pytest.mark.parametrize("cin, cout, kernel, stride, pads, bias", [
    (16, 8, 16, 8, [4, 4], True),   # the Piper decoder's ups.0 / ups.1 layout
    (8, 4, 8, 4, [2, 2], True),     # ups.2
    (5, 3, 7, 3, [1, 2], False),    # kernel not a multiple of the stride, uneven padding
    (4, 6, 3, 1, [0, 0], True),     # stride 1
    (3, 2, 4, 2, [0, 0], True),     # no padding: the output keeps its full tail
    (3, 2, 5, 2, [4, 3], False),    # padding past a whole stride
])
def test_polyphase_conv_matches_conv_transpose(cin, cout, kernel, stride, pads, bias):
    model = conv_transpose_model(cin, cout, kernel, stride, pads, bias, seed=kernel * 31 + stride)
    expected = create_session(model.SerializeToString(), threads=1)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert rewrite_conv_transposes(rewritten) == 1
    assert "ConvTranspose" not in {n.op_type for n in rewritten.graph.node}
    onnx.checker.check_model(rewritten)
    got = create_session(rewritten.SerializeToString(), threads=1)
    rng = np.random.default_rng(0)
    for length in (1, 2, 5, 64):
        if (length - 1) * stride + kernel - sum(pads) <= 0:
            continue  # no output at all: onnxruntime refuses such a ConvTranspose
        x = rng.standard_normal((1, cin, length)).astype(np.float32)
        (want,), (have,) = expected.run(None, {"x": x}), got.run(None, {"x": x})
        assert have.shape == want.shape
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5)


def test_grouped_or_dilated_conv_transpose_is_left_alone():
    model = conv_transpose_model(4, 4, 4, 2, [1, 1], True, seed=1)
    model.graph.node[0].attribute.append(helper.make_attribute("dilations", [2]))
    assert rewrite_conv_transposes(model) == 0
    assert [n.op_type for n in model.graph.node] == ["ConvTranspose"]


def test_a_graph_without_conv_transpose_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("UNITBUS_CACHE_DIR", str(tmp_path / "cache"))
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, None])])
    source = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8), str(source))
    with pytest.raises(ValueError):
        fast_voice(source, "plain-fast")
    assert engine._float_voice(source) == source  # the engine then runs the file as it is
    assert not (tmp_path / "cache" / "plain-fast").exists()


@pytest.fixture(scope="module")
def voices(tmp_path_factory, tts_voice):
    """The published voice file run as exported, and the default voice (rewritten) built in a fresh cache."""
    cache = tmp_path_factory.mktemp("cache")
    source = engine._resolve(engine.DEFAULT_VOICE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNITBUS_CACHE_DIR", str(cache))
        fast = engine.load_tts({"threads": 1})  # a key of its own: loaded now, into this cache
    return cache, create_session(source, threads=1), fast


def test_default_voice_is_the_cached_rewrite(voices, monkeypatch):
    cache, _, fast = voices
    built = cache / "en_US-joe-medium-fast"
    stamp = json.loads((built / "build.json").read_text())
    (source, facts), = stamp["sources"].items()
    assert source.endswith("en_US-joe-medium.onnx") and facts["size"] > 0
    # No temporary folders left: the rewrite and its split at the decoder (models/piper_split.py).
    assert sorted(p.name for p in cache.iterdir()) == ["en_US-joe-medium-fast", "en_US-joe-medium-fast-split"]
    ops = {n.op_type for n in onnx.load(str(built / "model.onnx"), load_external_data=False).graph.node}
    assert "ConvTranspose" not in ops
    before = (built / "model.onnx").stat().st_mtime_ns
    monkeypatch.setenv("UNITBUS_CACHE_DIR", str(cache))
    again = engine.load_tts({"threads": 2, "mode": "again"})
    assert again.model is not fast.model
    assert (built / "model.onnx").stat().st_mtime_ns == before  # reused, not rebuilt


def test_rewritten_voice_sounds_the_same(voices):
    _, exported, fast = voices
    for text in ("Hello.", "I would like a cup of coffee, please; with milk and no sugar."):
        for phonemes in fast.phonemize(text):
            ids = fast.model.ids(phonemes)
            # Random parts off (noise_scale = noise_w = 0): the two graphs must give the same waveform.
            want = exported.run(None, {
                "input": np.asarray([ids], np.int64),
                "input_lengths": np.asarray([len(ids)], np.int64),
                "scales": np.asarray([0.0, 1.0, 0.0], np.float32),
            })[0].reshape(-1)
            have = fast.model.run(ids, 0.0, 1.0, 0.0)
            assert have.shape == want.shape
            assert np.max(np.abs(have - want)) < 1e-4 * max(1.0, float(np.max(np.abs(want))))
            assert np.corrcoef(have, want)[0, 1] > 0.99999
