"""Whisper (CTranslate2 `model.bin`) to two onnxruntime graphs: an encoder and a one-token decoder.

The CTranslate2 file is read with numpy (format in MODELS.md); the graphs are built with `onnx.helper`.

- encoder.onnx: mel [1, 80, T] (T even, <= 3000) and, per layer, `tail_k/v_i` [1, heads, L, 64] -> the
  cross-attention keys and values of every decoder layer (`cross_k/v_i`, [1, heads, T/2, 64]) and each
  layer's self-attention K/V (`self_k/v_i`: the tail then the T/2 frames' own; with an empty tail, just
  their own). Self-attention attends over the T/2 frames plus the L tail
  frames, so a short window can stand in for Whisper's 30 s one: the tail is the K/V that frames of
  padding get in a silent 30 s window (computed once at load). The positional table is sliced to T/2.
  The cross K/V projections run once here instead of at every token.
- decoder.onnx: one token, its position and the self-attention cache -> logits [1, vocab] and the grown
  cache. One token per call keeps the graph free of a causal mask (the two prompt tokens take two calls).

Weights: the source is fp16. The decoder, which runs one token at a time and so is bound by reading
its weights, gets 8-bit `MatMulNBits` linear layers (accuracy_level 4, int8 activations: the fast kernel)
with `quantization="int8"`, or fp32 ones with "fp32". The encoder is always fp32 (exact), being as fast.
The token table stays fp16 (exact), gathered then cast; the output projection is tied to it.
Attention is onnxruntime's fused `MultiHeadAttention` (com.microsoft).
"""
from __future__ import annotations

import json
import logging
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# 5: weights in page-aligned encoder.onnx.data / decoder.onnx.data (memory-mapped); 6: tokenizer.npz
CONVERTER_VERSION = 6
QUANTIZATIONS = ("int8", "fp32")
# CTranslate2 DataType enum values.
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_COPIED_FILES = ("tokenizer.json", "config.json")
_NBITS_BLOCK = 32


# --------------------------------------------------------------------------- CTranslate2 reader

def read_ct2(path: str | Path) -> dict[str, np.ndarray]:
    """All variables of a CTranslate2 `model.bin` (aliases resolved) as numpy arrays."""
    buf = Path(path).read_bytes()
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        value = struct.unpack_from(fmt, buf, pos)[0]
        pos += struct.calcsize(fmt)
        return value

    def text() -> str:
        nonlocal pos
        n = take("<H")
        value = buf[pos:pos + n].rstrip(b"\0").decode()
        pos += n
        return value

    version = take("<I")
    if version < 2 or version > 6:
        raise ValueError(f"{path}: unsupported CTranslate2 binary version {version}")
    spec = text()
    take("<I")  # spec revision
    if spec != "WhisperSpec":
        raise ValueError(f"{path}: a {spec}, not a Whisper model")
    variables: dict[str, np.ndarray] = {}
    for _ in range(take("<I")):
        name = text()
        dims = [take("<I") for _ in range(take("<B"))]
        dtype_code = take("<B")
        nbytes = take("<I")
        if dtype_code not in _CT2_DTYPES:
            raise ValueError(f"{path}: variable {name} has unsupported dtype {dtype_code}")
        array = np.frombuffer(buf, dtype=_CT2_DTYPES[dtype_code], count=nbytes // np.dtype(_CT2_DTYPES[dtype_code]).itemsize, offset=pos)
        variables[name] = array.reshape(dims)
        pos += nbytes
    if version >= 3:
        for _ in range(take("<I")):
            alias, target = text(), text()
            variables[alias] = variables[target]
    return variables


def model_dims(w: dict[str, np.ndarray]) -> dict[str, int]:
    """Sizes read from the weights, so other Whisper sizes convert too."""
    if int(w["decoder/activation"]) != 3 or not bool(w["decoder/pre_norm"]):
        raise ValueError("expected Whisper's pre-norm transformer with exact GELU")
    return {
        "d_model": int(w["encoder/conv1/bias"].shape[0]),
        "n_mels": int(w["encoder/conv1/weight"].shape[1]),
        "enc_heads": int(w["encoder/num_heads"]),
        "dec_heads": int(w["decoder/num_heads"]),
        "enc_layers": sum(1 for k in w if k.startswith("encoder/layer_") and k.endswith("ffn/linear_0/weight")),
        "dec_layers": sum(1 for k in w if k.startswith("decoder/layer_") and k.endswith("ffn/linear_0/weight")),
        "n_audio_ctx": int(w["encoder/position_encodings/encodings"].shape[0]),
        "n_text_ctx": int(w["decoder/position_encodings/encodings"].shape[0]),
        "n_vocab": int(w["decoder/embeddings/weight"].shape[0]),
    }


# --------------------------------------------------------------------------- graph building

class _Graph:
    """Collects nodes and initializers; each helper returns its output name."""

    def __init__(self, quantization: str):
        from onnx import helper

        self.h = helper
        self.quantization = quantization
        self.nodes: list = []
        self.inits: list = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, array: np.ndarray, hint: str = "c") -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def ints(self, values: list[int]) -> str:
        return self.const(np.asarray(values, dtype=np.int64), "shape")

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, n_out: int = 1, domain: str = "", **attrs) -> Any:
        outs = [self.name(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(self.h.make_node(op_type, inputs, outs, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def layer_norm(self, x: str, w: dict, prefix: str) -> str:
        return self.op("LayerNormalization", [x, self.const(w[f"{prefix}/gamma"].astype(np.float32)),
                                              self.const(w[f"{prefix}/beta"].astype(np.float32))], epsilon=1e-5, axis=-1)

    def linear(self, x: str, weight: np.ndarray, bias: np.ndarray | None) -> str:
        """x @ weight.T + bias; weight is CTranslate2's [out, in]."""
        out_features, in_features = weight.shape
        if self.quantization == "int8" and in_features % _NBITS_BLOCK == 0:
            q, scales = _quantize_nbits8(weight.astype(np.float32))
            inputs = [x, self.const(q, "wq"), self.const(scales, "ws")]
            y = self.op("MatMulNBits", inputs, domain="com.microsoft", K=in_features, N=out_features,
                        bits=8, block_size=_NBITS_BLOCK, accuracy_level=4)
        else:
            y = self.op("MatMul", [x, self.const(weight.astype(np.float32).T, "w")])
        if bias is not None:
            y = self.op("Add", [y, self.const(bias.astype(np.float32), "b")])
        return y

    def gelu(self, x: str) -> str:
        return self.op("Gelu", [x], domain="com.microsoft")

    def heads(self, x: str, n_heads: int, head_dim: int) -> str:
        """[1, S, H*D] -> [1, H, S, D]."""
        r = self.op("Reshape", [x, self.ints([1, -1, n_heads, head_dim])])
        return self.op("Transpose", [r], perm=[0, 2, 1, 3])

    def attention(self, q: str, k: str, v: str, heads: int, past: tuple[str, str] | None = None) -> Any:
        """onnxruntime's fused MultiHeadAttention (scale D^-1/2, as Whisper's D^-1/4 on q and k).

        q [1, Sq, H*D]; k and v [1, Sk, H*D], or already split into heads [1, H, Sk, D] (cross-attention).
        With `past` ([1, H, P, D] each) the keys are past + k, and the present K/V come back too.
        """
        if past is None:
            return self.op("MultiHeadAttention", [q, k, v], domain="com.microsoft", num_heads=heads)
        return self.op("MultiHeadAttention", [q, k, v, "", "", "", past[0], past[1]], n_out=3,
                       domain="com.microsoft", num_heads=heads)

    def ffn(self, x: str, w: dict, prefix: str) -> str:
        h = self.layer_norm(x, w, f"{prefix}/ffn/layer_norm")
        h = self.gelu(self.linear(h, w[f"{prefix}/ffn/linear_0/weight"], w[f"{prefix}/ffn/linear_0/bias"]))
        h = self.linear(h, w[f"{prefix}/ffn/linear_1/weight"], w[f"{prefix}/ffn/linear_1/bias"])
        return self.op("Add", [x, h])

    def model(self, name: str, inputs: list, outputs: list) -> Any:
        graph = self.h.make_graph(self.nodes, name, inputs, outputs, self.inits)
        opsets = [self.h.make_opsetid("", 17), self.h.make_opsetid("com.microsoft", 1)]
        # IR 8 (onnx 1.13): loads in any onnxruntime >= 1.14 whatever onnx wrote the file
        return self.h.make_model(graph, opset_imports=opsets, producer_name="unitbus.whisper_ct2", ir_version=8)


def _quantize_nbits8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, K] fp32 -> MatMulNBits 8-bit blocks: uint8 [N, K/32, 32] with zero point 128, scales [N*K/32].

    Symmetric per 32-weight block (absmax/127) so the default zero point 128 applies and no zero-point
    input is needed.
    """
    n, k = weight.shape
    blocks = weight.reshape(n, k // _NBITS_BLOCK, _NBITS_BLOCK)
    scales = np.abs(blocks).max(axis=-1) / 127.0
    scales[scales == 0] = 1.0
    q = np.clip(np.rint(blocks / scales[..., None]), -127, 127).astype(np.int16) + 128
    return q.astype(np.uint8), scales.astype(np.float32).reshape(-1)


def build_encoder(w: dict[str, np.ndarray], quantization: str) -> Any:
    from onnx import TensorProto, helper

    d = model_dims(w)
    dm, heads = d["d_model"], d["enc_heads"]
    hd = dm // heads
    g = _Graph(quantization)
    mel = "mel"
    x = g.op("Conv", [mel, g.const(w["encoder/conv1/weight"].astype(np.float32)), g.const(w["encoder/conv1/bias"].astype(np.float32))],
             kernel_shape=[3], pads=[1, 1])
    x = g.gelu(x)
    x = g.op("Conv", [x, g.const(w["encoder/conv2/weight"].astype(np.float32)), g.const(w["encoder/conv2/bias"].astype(np.float32))],
             kernel_shape=[3], pads=[1, 1], strides=[2])
    x = g.op("Transpose", [g.gelu(x)], perm=[0, 2, 1])  # [1, T/2, D]
    frames = g.op("Slice", [g.op("Shape", [x]), g.ints([1]), g.ints([2])])
    pos = g.op("Slice", [g.const(w["encoder/position_encodings/encodings"].astype(np.float32), "pos"), g.ints([0]), frames, g.ints([0])])
    x = g.op("Add", [x, pos])
    inputs = [helper.make_tensor_value_info(mel, TensorProto.FLOAT, [1, d["n_mels"], "mel_frames"])]
    outputs = []
    for i in range(d["enc_layers"]):
        p = f"encoder/layer_{i}"
        h = g.layer_norm(x, w, f"{p}/self_attention/layer_norm")
        qkv = g.linear(h, w[f"{p}/self_attention/linear_0/weight"], w[f"{p}/self_attention/linear_0/bias"])
        q, k, v = g.op("Split", [qkv, g.ints([dm, dm, dm])], n_out=3, axis=-1)
        a, present_k, present_v = g.attention(q, k, v, heads, (f"tail_k_{i}", f"tail_v_{i}"))
        for kind, t in (("k", present_k), ("v", present_v)):
            # with an empty tail, present K/V are this layer's own: what the engine keeps from a silent window
            g.nodes.append(helper.make_node("Identity", [t], [f"self_{kind}_{i}"]))
            outputs.append(helper.make_tensor_value_info(f"self_{kind}_{i}", TensorProto.FLOAT, [1, heads, "frames", hd]))
            inputs.append(helper.make_tensor_value_info(f"tail_{kind}_{i}", TensorProto.FLOAT, [1, heads, "tail", hd]))
        a = g.linear(a, w[f"{p}/self_attention/linear_1/weight"], w[f"{p}/self_attention/linear_1/bias"])
        x = g.ffn(g.op("Add", [x, a]), w, p)
    x = g.layer_norm(x, w, "encoder/layer_norm")
    dh = d["dec_heads"]
    for i in range(d["dec_layers"]):
        p = f"decoder/layer_{i}/attention/linear_1"
        kv = g.linear(x, w[f"{p}/weight"], w[f"{p}/bias"])
        k, v = g.op("Split", [kv, g.ints([dm, dm])], n_out=2, axis=-1)
        for kind, t in (("k", k), ("v", v)):
            name = f"cross_{kind}_{i}"
            g.nodes.append(helper.make_node("Identity", [g.heads(t, dh, dm // dh)], [name]))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, dh, "frames", dm // dh]))
    return g.model("whisper_encoder", inputs, outputs)


def build_decoder(w: dict[str, np.ndarray], quantization: str) -> Any:
    from onnx import TensorProto, helper

    d = model_dims(w)
    dm, heads = d["d_model"], d["dec_heads"]
    hd = dm // heads
    g = _Graph(quantization)
    table = g.const(w["decoder/embeddings/weight"].astype(np.float16), "embed")  # exact: the source is fp16
    x = g.op("Cast", [g.op("Gather", [table, "token"])], to=TensorProto.FLOAT)  # [1, 1, D]
    pos = g.op("Gather", [g.const(w["decoder/position_encodings/encodings"].astype(np.float32), "pos"), "position"])
    x = g.op("Add", [x, pos])
    inputs = [helper.make_tensor_value_info("token", TensorProto.INT64, [1, 1]),
              helper.make_tensor_value_info("position", TensorProto.INT64, [1, 1])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, d["n_vocab"]])]
    for i in range(d["dec_layers"]):
        p = f"decoder/layer_{i}"
        for kind in ("k", "v"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", TensorProto.FLOAT, [1, heads, "past", hd]))
        for kind in ("k", "v"):
            inputs.append(helper.make_tensor_value_info(f"cross_{kind}_{i}", TensorProto.FLOAT, [1, heads, "frames", hd]))
        h = g.layer_norm(x, w, f"{p}/self_attention/layer_norm")
        qkv = g.linear(h, w[f"{p}/self_attention/linear_0/weight"], w[f"{p}/self_attention/linear_0/bias"])
        q, k, v = g.op("Split", [qkv, g.ints([dm, dm, dm])], n_out=3, axis=-1)
        a, present_k, present_v = g.attention(q, k, v, heads, (f"past_k_{i}", f"past_v_{i}"))
        for kind, t in (("k", present_k), ("v", present_v)):
            g.nodes.append(helper.make_node("Identity", [t], [f"present_{kind}_{i}"]))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{i}", TensorProto.FLOAT, [1, heads, "past_plus_1", hd]))
        x = g.op("Add", [x, g.linear(a, w[f"{p}/self_attention/linear_1/weight"], w[f"{p}/self_attention/linear_1/bias"])])
        h = g.layer_norm(x, w, f"{p}/attention/layer_norm")
        q = g.linear(h, w[f"{p}/attention/linear_0/weight"], w[f"{p}/attention/linear_0/bias"])
        a = g.attention(q, f"cross_k_{i}", f"cross_v_{i}", heads)
        x = g.op("Add", [x, g.linear(a, w[f"{p}/attention/linear_2/weight"], w[f"{p}/attention/linear_2/bias"])])
        x = g.ffn(x, w, p)
    x = g.layer_norm(x, w, "decoder/layer_norm")
    x = g.op("Reshape", [x, g.ints([1, dm])])
    logits = g.linear(x, w["decoder/projection/weight"], None)
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
    return g.model("whisper_decoder", inputs, outputs)


# --------------------------------------------------------------------------- cache

REQUIRED = ("encoder.onnx", "encoder.onnx.data", "decoder.onnx", "decoder.onnx.data", "dims.json", "tokenizer.npz",
            *_COPIED_FILES)


def stamp(model_dir: Path, quantization: str) -> dict[str, Any]:
    from models.cache import source_stamp

    return source_stamp([model_dir / name for name in ("model.bin", *_COPIED_FILES)], CONVERTER_VERSION,
                        quantization=quantization)


def cache_is_current(out_dir: Path, model_dir: Path, quantization: str) -> bool:
    """True when out_dir holds a finished conversion of exactly these source files."""
    from models.cache import is_current

    return is_current(out_dir, stamp(model_dir, quantization), REQUIRED)


def convert(model_dir: str | Path, out_dir: str | Path, quantization: str = "int8", force: bool = False) -> Path:
    """The CTranslate2 Whisper folder `model_dir` converted into `out_dir`, once (models/cache.py)."""
    from models.cache import build_once

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, not {quantization!r}")
    model_dir, out_dir = Path(model_dir), Path(out_dir)

    def build(folder: Path) -> None:
        from tqdm import tqdm

        from models.bpe_tables import save_bpe
        from models.onnx_graph import save_with_external_data

        with tqdm(total=4, desc=f"convert {out_dir.name}", unit="step") as bar:
            weights = read_ct2(model_dir / "model.bin")
            bar.update()
            # The encoder stays fp32: over many frames 8-bit MatMulNBits measured no faster than fp32 here.
            save_with_external_data(build_encoder(weights, "fp32"), folder / "encoder.onnx")
            bar.update()
            save_with_external_data(build_decoder(weights, quantization), folder / "decoder.onnx")
            bar.update()
            for name in _COPIED_FILES:
                shutil.copy2(model_dir / name, folder / name)
            save_bpe(model_dir / "tokenizer.json", folder / "tokenizer.npz")  # the engine decodes with its token bytes
            (folder / "dims.json").write_text(json.dumps(model_dims(weights)))
            bar.update()
        log.info("converted %s to %s (%s)", model_dir, out_dir, quantization)

    return build_once(out_dir, stamp(model_dir, quantization), build, REQUIRED, force=force)


def cache_path(name: str, quantization: str) -> Path:
    from core.paths import cache_dir

    return cache_dir() / name / quantization


def source_dir(mode_param: dict[str, Any]) -> Path:
    from core.paths import resolve_pkg_url

    ref = str(mode_param["model_dir"])
    return resolve_pkg_url(ref) if ref.startswith("pkg://") else Path(ref)


def convert_manifest(manifest: dict[str, Any], force: bool = False) -> Path:
    """Convert the model a `mode_whisper-*.json` manifest names; returns the cache folder."""
    param = manifest["mode_param"]
    quantization = str(param.get("quantization", "int8"))
    return convert(source_dir(param), cache_path(manifest["mode"], quantization), quantization, force=force)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    print(convert_manifest(json.loads(args.manifest.read_text()), force=args.force))
