"""The float voice's graph with its upsampling layers rewritten into faster, equivalent operators.

onnxruntime runs a 1-D ConvTranspose as a GEMM into a column buffer kernel-size times the input,
then scatters the columns into the output (col2im); in the Piper (HiFi-GAN) decoder its three
upsampling layers took ~11% of the graph's time, and the rewrite makes a whole run 4-7% faster
(tests/bench/bench_tts.py). Each is rewritten in its polyphase form: one
ordinary Conv with stride x the output channels and ceil(kernel / stride) taps, whose channels are
then interleaved into time (Reshape, Transpose, Reshape) and trimmed by the padding (Slice). The
products and sums are the same, only added in another order, so the waveform matches the original
graph's to float rounding (tested in tests/units/tts/test_tts_optimize.py).

Built once and cached (models/cache.py); needs the onnx package (the "convert" extra).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from models.cache import build_once, source_stamp
from models.onnx_graph import replace_nodes

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INT64_MAX = np.iinfo(np.int64).max


def fast_voice(model: Path, name: str) -> Path:
    """Path of the rewritten float voice for `model`, building and caching it when needed.

    Raises ImportError when the onnx package is missing and ValueError when the graph has no
    ConvTranspose that this rewrite handles (nothing would get faster).
    """
    def build(dest: Path) -> None:
        import onnx

        log.info("building the float voice %s from %s (once, a few seconds)", name, model)
        proto = onnx.load(str(model))
        if not rewrite_conv_transposes(proto):
            raise ValueError(f"{model}: no 1-D ConvTranspose to rewrite")
        onnx.checker.check_model(proto)
        onnx.save(proto, str(dest))

    from core.paths import cache_dir

    target = build_once(cache_dir() / name, source_stamp([model], FORMAT_VERSION),
                        lambda folder: build(folder / "model.onnx"), ["model.onnx"])
    return target / "model.onnx"


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _polyphase_weights(w: np.ndarray, stride: int) -> np.ndarray:
    """ConvTranspose weights (Cin, Cout, K) -> Conv weights (Cout * stride, Cin, taps).

    Output t of the transposed convolution, with q, r = divmod(t + pad, stride), is
    sum_j x[q - j] . w[r + stride * j]: phase r is an ordinary convolution of x. Conv channel
    c * stride + r holds phase r of output channel c; tap m reads x[q - (taps - 1) + m].
    """
    cin, cout, k = w.shape
    taps = -(-k // stride)
    padded = np.zeros((cin, cout, taps * stride), np.float32)
    padded[:, :, :k] = w
    # [cin, cout, j, r] -> [cout, r, cin, j], then j reversed so that tap m = taps - 1 - j
    phases = padded.reshape(cin, cout, taps, stride).transpose(1, 3, 0, 2)[..., ::-1]
    return np.ascontiguousarray(phases.reshape(cout * stride, cin, taps))


def rewrite_conv_transposes(model) -> int:
    """Rewrite every 1-D ConvTranspose with constant weights in place; returns how many were rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes, new_inits, done = [], [], 0
    for node in graph.node:
        a = _attrs(node)
        w_init = inits.get(node.input[1]) if node.op_type == "ConvTranspose" and len(node.input) > 1 else None
        if (
            w_init is None or len(w_init.dims) != 3 or a.get("group", 1) != 1
            or any(v != 1 for v in a.get("dilations", [1])) or any(a.get("output_padding", [0]))
            or "output_shape" in a or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
            or (len(node.input) > 2 and node.input[2] and node.input[2] not in inits)
        ):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(w_init).astype(np.float32)
        cin, cout, k = w.shape
        (stride,) = a.get("strides", [1])
        pad_begin, pad_end = a.get("pads", [0, 0])
        taps = -(-k // stride)
        # Conv output q = 0 .. L + taps - 2 covers every t: flat index q * stride + r = t + pad_begin.
        end = k - pad_end - taps * stride  # where the output ends, counted from the flat end (<= 0)
        base = f"{node.name or node.output[0]}/polyphase"

        def n(part: str, base: str = base) -> str:
            return f"{base}/{part}"

        consts = {
            n("W"): _polyphase_weights(w, stride),
            n("shape_phases"): np.asarray([0, cout, stride, -1], np.int64),
            n("shape_time"): np.asarray([0, cout, -1], np.int64),
            n("start"): np.asarray([pad_begin], np.int64),
            n("end"): np.asarray([end if end < 0 else INT64_MAX], np.int64),
            n("axis"): np.asarray([2], np.int64),
        }
        conv_inputs = [node.input[0], n("W")]
        if len(node.input) > 2 and node.input[2]:
            consts[n("B")] = np.repeat(numpy_helper.to_array(inits[node.input[2]]).astype(np.float32), stride)
            conv_inputs.append(n("B"))
        new_inits += [numpy_helper.from_array(value, key) for key, value in consts.items()]
        nodes += [
            helper.make_node("Conv", conv_inputs, [n("phases")], name=n("Conv"),
                             kernel_shape=[taps], pads=[taps - 1, taps - 1], strides=[1], dilations=[1], group=1),
            helper.make_node("Reshape", [n("phases"), n("shape_phases")], [n("split")], name=n("Reshape")),
            helper.make_node("Transpose", [n("split")], [n("interleaved")], name=n("Transpose"), perm=[0, 1, 3, 2]),
            helper.make_node("Reshape", [n("interleaved"), n("shape_time")], [n("flat")], name=n("Reshape_1")),
            helper.make_node("Slice", [n("flat"), n("start"), n("end"), n("axis")], [node.output[0]], name=n("Slice")),
        ]
        done += 1
    if done:
        replace_nodes(graph, nodes, new_inits)  # the replaced ConvTranspose weights go
    return done
