"""A streaming version of openWakeWord's `embedding_model.onnx`, built without the onnx package.

The embedding network is convolutional along time with no time padding, and its three time-stride-2 pools
make its total time stride exactly 8 mel frames, one openWakeWord step. So the embedding of the 76-frame
window ending at step j equals what the network computes at step j over the whole stream. The rewrite feeds
only the new mel frames (8 per step, or 8k for k steps) and gives every time-kernel-3 convolution the last
two input rows of the previous call as a cache: Concat(cache, new) -> Conv, and Slice(last 2) -> new cache.
Per step that is about a tenth of the convolution work of recomputing the 76-frame window.

ONNX files are protocol buffers; the few messages involved are read and written here with a minimal wire
codec (stdlib only, as the engine layer must), copying weights and unchanged nodes byte for byte.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from core.paths import cache_dir

log = logging.getLogger(__name__)

CONVERTER_VERSION = 1
CACHE_NAME = "openwakeword-embedding-stream"
INPUT = "mel_frames"  # [1, 1, frames (multiple of 8), 32]
OUTPUT = "embeddings"  # [steps, 96]
FRAMES_PER_STEP = 8
_INT64, _FLOAT = 7, 1

# ---- protobuf wire format ----


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 values are sent as 10-byte two's complement
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of every field of one message, in order."""
    out: list[tuple[int, int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
            out.append((num, wire, value))
        elif wire == 2:
            size, pos = _read_varint(buf, pos)
            out.append((num, wire, buf[pos:pos + size]))
            pos += size
        elif wire == 1:
            out.append((num, wire, buf[pos:pos + 8]))
            pos += 8
        elif wire == 5:
            out.append((num, wire, buf[pos:pos + 4]))
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return out


def _len(num: int, payload: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _int(num: int, value: int) -> bytes:
    return _varint(num << 3) + _varint(value)


def _str(num: int, text: str) -> bytes:
    return _len(num, text.encode())


def _ints(values: bytes | int) -> list[int]:
    """A repeated int64 field's values, packed or not."""
    raw = [values] if isinstance(values, int) else []
    pos = 0
    while isinstance(values, bytes) and pos < len(values):
        v, pos = _read_varint(values, pos)
        raw.append(v)
    return [v - (1 << 64) if v >= 1 << 63 else v for v in raw]


# ---- ONNX messages (field numbers from onnx.proto) ----


@dataclass
class _Node:
    op: str
    inputs: list[str]
    outputs: list[str]
    name: str = ""
    attrs: list[bytes] = field(default_factory=list)  # encoded AttributeProto messages

    def ints(self, attr: str) -> list[int] | None:
        for raw in self.attrs:
            parsed = _fields(raw)
            if any(n == 1 and v == attr.encode() for n, _, v in parsed):
                return [x for n, _, v in parsed if n == 8 for x in _ints(v)]
        return None

    def encode(self) -> bytes:
        out = b"".join(_str(1, i) for i in self.inputs) + b"".join(_str(2, o) for o in self.outputs)
        out += _str(3, self.name) + _str(4, self.op)
        return out + b"".join(_len(5, a) for a in self.attrs)


def _parse_node(buf: bytes) -> _Node:
    node = _Node("", [], [])
    for num, _, value in _fields(buf):
        if num == 1:
            node.inputs.append(value.decode())
        elif num == 2:
            node.outputs.append(value.decode())
        elif num == 3:
            node.name = value.decode()
        elif num == 4:
            node.op = value.decode()
        elif num == 5:
            node.attrs.append(value)
        elif num == 7 and value:
            raise ValueError(f"node in domain {value.decode()} is not expected here")
    return node


def _attr_ints(name: str, values: list[int]) -> bytes:
    return _str(1, name) + b"".join(_int(8, v) for v in values) + _int(20, 7)  # type INTS


def _attr_int(name: str, value: int) -> bytes:
    return _str(1, name) + _int(3, value) + _int(20, 2)  # type INT


def _int64_tensor(name: str, values: list[int]) -> bytes:
    raw = struct.pack(f"<{len(values)}q", *values)
    return _int(1, len(values)) + _int(2, _INT64) + _str(8, name) + _len(9, raw)


def _value_info(name: str, dims: list[int | str]) -> bytes:
    shape = b"".join(_len(1, _str(2, d) if isinstance(d, str) else _int(1, d)) for d in dims)
    return _str(1, name) + _len(2, _len(1, _int(1, _FLOAT) + _len(2, shape)))


# ---- the rewrite ----


@dataclass
class StreamGraph:
    model: bytes  # ModelProto
    caches: list[tuple[str, str, tuple[int, ...]]]  # (input name, output name, shape) per cache


def build(source: bytes) -> StreamGraph:
    """The streaming graph from the bytes of openWakeWord's embedding_model.onnx (ValueError if it differs)."""
    model = _fields(source)
    graph_raw = next(v for n, _, v in model if n == 7)
    ir_version = next(v for n, _, v in model if n == 1)
    opsets = [v for n, _, v in model if n == 8]
    graph = _fields(graph_raw)
    nodes = [_parse_node(v) for n, _, v in graph if n == 1]
    initializers = [v for n, _, v in graph if n == 5]
    weights: dict[str, list[int]] = {}
    for raw in initializers:
        parsed = _fields(raw)
        tname = next(v.decode() for n, _, v in parsed if n == 8)
        weights[tname] = [x for n, _, v in parsed if n == 1 for x in _ints(v)]

    first, last = nodes[0], nodes[-1]
    if first.op != "Reshape" or last.op != "Reshape" or nodes[-2].op != "Conv":
        raise ValueError("not the openWakeWord embedding model: unexpected first/last nodes")
    body = nodes[1:-1]
    renamed = {first.outputs[0]: INPUT}

    out_nodes: list[_Node] = []
    extra_inits = [_int64_tensor("stream/start", [-2]), _int64_tensor("stream/end", [1 << 62]),
                   _int64_tensor("stream/axis", [2]), _int64_tensor("stream/out_shape", [-1, 96])]
    caches: list[tuple[str, str, tuple[int, ...]]] = []
    freq = 32
    time_stride = 1
    for node in body:
        node.inputs = [renamed.get(i, i) for i in node.inputs]
        kernel = node.ints("kernel_shape") or []
        if node.op == "Conv":
            pads = node.ints("pads") or [0, 0, 0, 0]
            if node.ints("strides") not in (None, [1, 1]) or pads[0] or pads[2]:
                raise ValueError(f"{node.name}: convolution strides or time padding not supported")
            w = weights[node.inputs[1]]
            if kernel[0] == 3:
                i = len(caches)
                cin, cout = f"cache_in_{i}", f"cache_out_{i}"
                cat = f"stream/cat_{i}"
                out_nodes.append(_Node("Concat", [cin, node.inputs[0]], [cat], f"stream/concat_{i}",
                                       [_attr_int("axis", 2)]))
                out_nodes.append(_Node("Slice", [cat, "stream/start", "stream/end", "stream/axis"], [cout],
                                       f"stream/slice_{i}"))
                caches.append((cin, cout, (1, w[1], 2, freq)))
                node.inputs[0] = cat
            elif kernel[0] != 1:
                raise ValueError(f"{node.name}: time kernel {kernel[0]} not supported")
            freq = freq + pads[1] + pads[3] - kernel[1] + 1
        elif node.op == "MaxPool":
            strides = node.ints("strides") or kernel
            if kernel[0] != strides[0] or (node.ints("pads") or [0, 0, 0, 0]) != [0, 0, 0, 0]:
                raise ValueError(f"{node.name}: pooling layout not supported")
            time_stride *= strides[0]
            freq = (freq - kernel[1]) // strides[1] + 1
        elif node.op not in ("LeakyRelu", "Max"):
            raise ValueError(f"{node.op} is not expected in the embedding model")
        out_nodes.append(node)
    if time_stride != FRAMES_PER_STEP or freq != 1:
        raise ValueError(f"embedding model time stride {time_stride}, final width {freq}: not streamable")

    conv_out = body[-1].outputs[0]
    out_nodes.append(_Node("Transpose", [conv_out], ["stream/nhwc"], "stream/transpose",
                           [_attr_ints("perm", [0, 2, 3, 1])]))
    out_nodes.append(_Node("Reshape", ["stream/nhwc", "stream/out_shape"], [OUTPUT], "stream/reshape"))

    used = {i for node in out_nodes for i in node.inputs}
    kept_inits = [raw for raw in initializers
                  if next(v.decode() for n, _, v in _fields(raw) if n == 8) in used]

    g = b"".join(_len(1, node.encode()) for node in out_nodes) + _str(2, "openwakeword_embedding_stream")
    g += b"".join(_len(5, raw) for raw in kept_inits + extra_inits)
    g += _len(11, _value_info(INPUT, [1, 1, "frames", 32]))
    g += b"".join(_len(11, _value_info(cin, list(shape))) for cin, _, shape in caches)
    g += _len(12, _value_info(OUTPUT, ["steps", 96]))
    g += b"".join(_len(12, _value_info(cout, list(shape))) for _, cout, shape in caches)
    out = _int(1, ir_version) + b"".join(_len(8, o) for o in opsets) + _str(2, "unitbus") + _len(7, g)
    return StreamGraph(out, caches)


def _cached(target: Path, stamp: dict) -> tuple[Path, list[tuple[str, str, tuple[int, ...]]]] | None:
    try:
        meta = json.loads((target / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("stamp") != stamp or not (target / "model.onnx").is_file():
        return None
    return target / "model.onnx", [(a, b, tuple(shape)) for a, b, shape in meta["caches"]]


def cached_build(source: Path) -> tuple[Path, list[tuple[str, str, tuple[int, ...]]]]:
    """The streaming graph for `source`, converted once and kept under the cache directory.

    Reused while the recorded source size, mtime and converter version match; written to a temporary
    folder and renamed into place, so an interrupted conversion never leaves a half-written cache.
    """
    stat = source.stat()
    stamp = {"source": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
             "converter": CONVERTER_VERSION}
    root = cache_dir()
    target = root / CACHE_NAME
    found = _cached(target, stamp)
    if found:
        return found
    graph = build(source.read_bytes())
    tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}-", dir=root))
    try:
        (tmp / "model.onnx").write_bytes(graph.model)
        (tmp / "meta.json").write_text(json.dumps({"stamp": stamp, "caches": graph.caches}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError:
        # Another process may have renamed its own conversion into place first; that one is as good.
        found = _cached(target, stamp)
        if not found:
            raise
        return found
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("converted %s to a streaming graph in %s", source.name, target)
    return target / "model.onnx", graph.caches
