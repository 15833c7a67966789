"""Optional int8 build of a Piper voice: the HiFi-GAN decoder's convolutions in int8 (QDQ).

The decoder is about 70% of the synthesis time and int8 convolutions roughly halve it. Only the
decoder is quantized: the text encoder, duration predictor and flow decide timing and stay float,
so the int8 voice speaks with the same rhythm. The cost is a higher noise floor in pauses (about
-50 dB below the peak instead of -70 dB or lower), which is why it is opt-in (`quantize: "int8"`).

Built once from calibration sentences spoken by the float voice's own phonemizer, then cached
(models/cache.py).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from models.cache import build_once, source_stamp
from models.onnx_graph import replace_nodes

log = logging.getLogger(__name__)

CALIBRATION_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the weather like today?",
    "I would like a cup of coffee, please.",
    "Artificial intelligence on small devices is getting better every year.",
    "Turn on the kitchen lights!",
    "She sells sea shells by the sea shore.",
    "Numbers like three point five and twelve thousand are read aloud.",
    "Hello, my name is Joe; how can I help you?",
]
FORMAT_VERSION = 1


def int8_voice(model: Path, name: str, calibration_ids: Callable[[Iterable[str]], list[list[int]]]) -> Path:
    """Path of the int8-decoder voice for `model`, building and caching it when needed.

    `calibration_ids` turns texts into phoneme id sequences (the float voice's own front end).
    Raises ImportError when the onnx package (needed by onnxruntime.quantization) is missing and
    ValueError when the file has no Piper decoder convolutions.
    """
    def build(dest: Path) -> None:
        log.info("building the int8 voice %s from %s (once, about 10 s)", name, model)
        _quantize(model, dest, calibration_ids(CALIBRATION_TEXTS))

    from core.paths import cache_dir

    target = build_once(cache_dir() / name, source_stamp([model], FORMAT_VERSION),
                        lambda folder: build(folder / "model.onnx"), ["model.onnx"])
    return target / "model.onnx"


def _decoder_convs(graph) -> list:
    """Piper exports name decoder nodes /dec/...; conv_post writes the waveform itself and stays float."""
    inits = {i.name for i in graph.initializer}
    return [
        n for n in graph.node
        if n.op_type == "Conv" and n.name.startswith("/dec/") and "conv_post" not in n.name
        and n.input[1] in inits and (len(n.input) < 3 or n.input[2] in inits)
    ]


def _activation_ranges(model, tensors: list[str], sequences: list[list[int]]) -> dict[str, tuple[float, float]]:
    """Min and max of each tensor over the calibration sentences (the model run with extra outputs)."""
    import onnx
    from onnx import TensorProto, helper

    from core.runtime import create_session

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors)
    session = create_session(probe.SerializeToString())
    lo = {t: np.inf for t in tensors}
    hi = {t: -np.inf for t in tensors}
    for ids in sequences:
        outs = session.run(tensors, {
            "input": np.asarray([ids], dtype=np.int64),
            "input_lengths": np.asarray([len(ids)], dtype=np.int64),
            "scales": np.asarray([0.667, 1.0, 0.8], dtype=np.float32),
        })
        for t, v in zip(tensors, outs):
            lo[t] = min(lo[t], float(v.min()))
            hi[t] = max(hi[t], float(v.max()))
    return {t: (lo[t], hi[t]) for t in tensors}


def _uint8_params(lo: float, hi: float) -> tuple[float, int]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    return scale, int(np.clip(round(-lo / scale), 0, 255))


def _quantize(source: Path, dest: Path, sequences: list[list[int]]) -> None:
    """Rewrite the decoder convolutions as QDQ (uint8 activations, per-channel int8 weights, int32
    bias); onnxruntime fuses each DequantizeLinear -> Conv -> QuantizeLinear group into QLinearConv."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    convs = _decoder_convs(graph)
    if not convs:
        raise ValueError(f"{source}: no Piper decoder convolutions (/dec/...) to quantize")
    tensors = sorted({n.input[0] for n in convs} | {n.output[0] for n in convs})
    ranges = _activation_ranges(model, tensors, sequences)
    inits = {i.name: i for i in graph.initializer}
    new_inits = []
    qdq: dict[str, str] = {}  # float tensor -> its quantize-dequantize copy

    def fake_quant(name: str, out: str | None = None) -> tuple[list, str]:
        scale, zp = _uint8_params(*ranges[name])
        s_name, z_name = f"{name}_qscale", f"{name}_qzero"
        new_inits.append(numpy_helper.from_array(np.asarray(scale, np.float32), s_name))
        new_inits.append(numpy_helper.from_array(np.asarray(zp, np.uint8), z_name))
        deq = out or f"{name}_qdq"
        return [
            helper.make_node("QuantizeLinear", [name, s_name, z_name], [f"{name}_q"]),
            helper.make_node("DequantizeLinear", [f"{name}_q", s_name, z_name], [deq]),
        ], deq

    chosen = {id(n) for n in convs}
    nodes = []
    for node in graph.node:
        if id(node) not in chosen:
            nodes.append(node)
            continue
        x, w_name, y = node.input[0], node.input[1], node.output[0]
        if x not in qdq:
            pair, qdq[x] = fake_quant(x)
            nodes.extend(pair)
        w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
        w_scale = np.maximum(np.abs(w).reshape(w.shape[0], -1).max(axis=1), 1e-12) / 127.0
        shape = (-1,) + (1,) * (w.ndim - 1)
        w_q = np.clip(np.round(w / w_scale.reshape(shape)), -127, 127).astype(np.int8)
        new_inits += [
            numpy_helper.from_array(w_q, f"{w_name}_int8"),
            numpy_helper.from_array(w_scale.astype(np.float32), f"{w_name}_wscale"),
            numpy_helper.from_array(np.zeros(w.shape[0], np.int8), f"{w_name}_wzero"),
        ]
        nodes.append(helper.make_node(
            "DequantizeLinear", [f"{w_name}_int8", f"{w_name}_wscale", f"{w_name}_wzero"], [f"{w_name}_deq"], axis=0))
        inputs = [qdq[x], f"{w_name}_deq"]
        if len(node.input) > 2 and node.input[2]:
            b_name = node.input[2]
            b = numpy_helper.to_array(inits[b_name]).astype(np.float64)
            b_scale = (_uint8_params(*ranges[x])[0] * w_scale).astype(np.float32)
            new_inits += [
                numpy_helper.from_array(np.round(b / b_scale).astype(np.int32), f"{b_name}_int32"),
                numpy_helper.from_array(b_scale, f"{b_name}_bscale"),
                numpy_helper.from_array(np.zeros(b.shape[0], np.int32), f"{b_name}_bzero"),
            ]
            nodes.append(helper.make_node(
                "DequantizeLinear",
                [f"{b_name}_int32", f"{b_name}_bscale", f"{b_name}_bzero"],
                [f"{b_name}_deq"],
                axis=0,
            ))
            inputs.append(f"{b_name}_deq")
        conv = onnx.NodeProto()
        conv.CopyFrom(node)
        del conv.input[:]
        conv.input.extend(inputs)
        conv.output[0] = f"{y}_float"
        nodes.append(conv)
        pair, _ = fake_quant(y, out=y)
        pair[0].input[0] = f"{y}_float"  # Conv -> Q -> DQ -> y: consumers of y are unchanged
        nodes.extend(pair)
        qdq[y] = y  # already quantize-dequantized in place: a following conv reads it as is
    replace_nodes(graph, nodes, new_inits)  # the replaced float weights go
    onnx.checker.check_model(model)
    onnx.save(model, str(dest))
