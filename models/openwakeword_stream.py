"""A streaming version of openWakeWord's `embedding_model.onnx`, built once with the onnx package.

The embedding network is convolutional along time with no time padding, and its three time-stride-2 pools
make its total time stride exactly 8 mel frames, one openWakeWord step. So the embedding of the 76-frame
window ending at step j equals what the network computes at step j over the whole stream. The rewrite feeds
only the new mel frames (8 per step, or 8k for k steps) and gives every time-kernel-3 convolution the last
two input rows of the previous call as a cache: Concat(cache, new) -> Conv, and Slice(last 2) -> new cache.
Per step that is about a tenth of the convolution work of recomputing the 76-frame window.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CONVERTER_VERSION = 2
CACHE_NAME = "openwakeword-embedding-stream"
INPUT = "mel_frames"  # [1, 1, frames (multiple of 8), 32]
OUTPUT = "embeddings"  # [steps, 96]
FRAMES_PER_STEP = 8
REQUIRED = ("model.onnx", "caches.json")

Caches = list[tuple[str, str, tuple[int, ...]]]  # (input name, output name, shape) per cache


def _ints(node: Any, name: str) -> list[int] | None:
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return list(helper.get_attribute_value(attr))
    return None


def build(source: bytes) -> tuple[bytes, Caches]:
    """The streaming graph (ModelProto bytes) and its caches, from the bytes of openWakeWord's
    embedding_model.onnx; ValueError if the graph is not that model."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_from_string(source)
    nodes = list(model.graph.node)
    if len(nodes) < 3 or nodes[0].op_type != "Reshape" or nodes[-1].op_type != "Reshape" or nodes[-2].op_type != "Conv":
        raise ValueError("not the openWakeWord embedding model: unexpected first/last nodes")
    weights = {init.name: init for init in model.graph.initializer}
    body = nodes[1:-1]
    renamed = {nodes[0].output[0]: INPUT}

    out_nodes = []
    caches: Caches = []
    freq, time_stride = 32, 1
    for node in body:
        node = onnx.NodeProto.FromString(node.SerializeToString())  # a copy: the source graph stays as it is
        inputs = [renamed.get(i, i) for i in node.input]
        kernel = _ints(node, "kernel_shape") or []
        if node.op_type == "Conv":
            pads = _ints(node, "pads") or [0, 0, 0, 0]
            if _ints(node, "strides") not in (None, [1, 1]) or pads[0] or pads[2]:
                raise ValueError(f"{node.name}: convolution strides or time padding not supported")
            if kernel[0] == 3:
                i = len(caches)
                cin, cout, cat = f"cache_in_{i}", f"cache_out_{i}", f"stream/cat_{i}"
                out_nodes.append(helper.make_node("Concat", [cin, inputs[0]], [cat], f"stream/concat_{i}", axis=2))
                out_nodes.append(helper.make_node("Slice", [cat, "stream/start", "stream/end", "stream/axis"], [cout],
                                                  f"stream/slice_{i}"))
                channels = int(weights[inputs[1]].dims[1])
                caches.append((cin, cout, (1, channels, 2, freq)))
                inputs[0] = cat
            elif kernel[0] != 1:
                raise ValueError(f"{node.name}: time kernel {kernel[0]} not supported")
            freq = freq + pads[1] + pads[3] - kernel[1] + 1
        elif node.op_type == "MaxPool":
            strides = _ints(node, "strides") or kernel
            if kernel[0] != strides[0] or (_ints(node, "pads") or [0, 0, 0, 0]) != [0, 0, 0, 0]:
                raise ValueError(f"{node.name}: pooling layout not supported")
            time_stride *= strides[0]
            freq = (freq - kernel[1]) // strides[1] + 1
        elif node.op_type not in ("LeakyRelu", "Max"):
            raise ValueError(f"{node.op_type} is not expected in the embedding model")
        del node.input[:]
        node.input.extend(inputs)
        out_nodes.append(node)
    if time_stride != FRAMES_PER_STEP or freq != 1:
        raise ValueError(f"embedding model time stride {time_stride}, final width {freq}: not streamable")

    out_nodes.append(helper.make_node("Transpose", [body[-1].output[0]], ["stream/nhwc"], "stream/transpose",
                                      perm=[0, 2, 3, 1]))
    out_nodes.append(helper.make_node("Reshape", ["stream/nhwc", "stream/out_shape"], [OUTPUT], "stream/reshape"))
    used = {i for node in out_nodes for i in node.input}
    constants = [numpy_helper.from_array(np.array(v, np.int64), name) for name, v in
                 (("stream/start", [-2]), ("stream/end", [1 << 62]), ("stream/axis", [2]), ("stream/out_shape", [-1, 96]))]
    graph = helper.make_graph(
        out_nodes, "openwakeword_embedding_stream",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [1, 1, "frames", 32]),
         *(helper.make_tensor_value_info(cin, TensorProto.FLOAT, list(shape)) for cin, _, shape in caches)],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["steps", 96]),
         *(helper.make_tensor_value_info(cout, TensorProto.FLOAT, list(shape)) for _, cout, shape in caches)],
        [init for init in model.graph.initializer if init.name in used] + constants)
    stream = helper.make_model(graph, opset_imports=model.opset_import, producer_name="unitbus")
    stream.ir_version = model.ir_version
    onnx.checker.check_model(stream)
    return stream.SerializeToString(), caches


def cached_build(source: Path) -> tuple[Path, Caches]:
    """The streaming graph for `source` and its caches, converted once (models/cache.py)."""
    from core.paths import cache_dir
    from models.cache import build_once, source_stamp

    def write(folder: Path) -> None:
        model, caches = build(source.read_bytes())
        (folder / "model.onnx").write_bytes(model)
        (folder / "caches.json").write_text(json.dumps(caches))
        log.info("converted %s to a streaming graph", source.name)

    target = build_once(cache_dir() / CACHE_NAME, source_stamp([source], CONVERTER_VERSION), write, REQUIRED)
    caches = [(a, b, tuple(shape)) for a, b, shape in json.loads((target / "caches.json").read_text())]
    return target / "model.onnx", caches
