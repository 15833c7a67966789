"""llama-architecture GGUF to an onnxruntime graph, a `tokenizers` tokenizer.json (plus its compiled tables,
tokenizer.npz) and a config.json.

The GGUF is read with the `gguf` package's `GGUFReader`; the graph is built with `onnx.helper`.
Weights keep their GGUF precision, exactly (MODELS.md, "SmolLM2 GGUF to an onnxruntime graph"):

- Q4_0 (w = d*(q-8)): 4-bit `MatMulNBits`, scales d, no zero point.
- Q4_1 (w = d*q + m = d*(q-8) + (m+8d)): the same 4-bit `MatMulNBits` plus a small fp32 MatMul of the
  per-block sums of x with (m+8d). No zero point: float zero points take a much slower kernel, and
  rounding -m/d to an integer zero point breaks the model.
- Q8_0 (w = d*q): 8-bit `MatMulNBits` with B = q+128, scales d.
- F16/F32: plain fp32 MatMul.
All `MatMulNBits` use accuracy_level=4 (activations quantized to int8 per block of 32, as llama.cpp
does): twice the decode speed, at a logit correlation of about 0.9993 with an exact fp64 forward pass.

The token table stays out of the graph: `token_embd.bin` holds its rows as int8 values with an fp32 scale
and offset per block of 32 (row = q * scale + offset: exact for Q8_0, Q4_0 and Q4_1; F16/F32 tables are
stored as float32 rows), and the engine reads the rows it needs with pread. Nothing of the table is
resident beyond those rows; an in-graph gather over a memory-mapped table kept ~22 MB of it resident
after a hundred tokens (page fault-around). The output head is `output.weight`, or the token table when
the model ties them, as a MatMulNBits like the other weights.

Graph (batch 1, GroupQueryAttention's shared past/present buffer layout [1, kv_heads, capacity, head_dim]):
  inputs  inputs_embeds [1, S, width] float32, seqlens_k [1] int32 (total length - 1),
          total_sequence_length [] int32, num_logits_to_keep [1] int64, past_key_values.{i}.key/.value
  outputs logits [1, num_logits_to_keep, vocab], present.{i}.key/.value, hidden_states.{l} for l in
          1..n_layers (l: the residual stream after layer l; n_layers: after the final norm, as Hugging
          Face numbers them; 0 would be inputs_embeds); hidden states cost nothing unless fetched.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

log = logging.getLogger(__name__)

CONVERTER_VERSION = 5  # 5: tokenizer.npz records its pair shift; the chat form is decided here
BLOCK = 32
# Token texts llama.cpp also treats as end of generation when they are control tokens.
_END_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<|end_of_text|>", "</s>", "<end_of_turn>")
# GGML type ids (gguf.GGMLQuantizationType) this converter reads.
F32, F16, Q4_0, Q4_1, Q8_0 = 0, 1, 2, 3, 8
_TYPE_NAMES = {F32: "F32", F16: "F16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0"}
# GPT-2's pre-tokenizer split, and the llama-3 one (llama.cpp `llama-bpe`).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class UnsupportedModel(ValueError):
    """The GGUF uses an architecture, tensor type or tokenizer this converter does not handle."""


# --------------------------------------------------------------------------- GGUF reading

@dataclass
class Weight:
    """One 2-D GGUF weight in MatMulNBits form. Shape is (n out, k in), as GGUF stores rows."""

    name: str
    ggml_type: int
    n: int
    k: int
    packed: np.ndarray | None = None  # uint8 [n, k/32, 16 or 32]
    scales: np.ndarray | None = None  # float32 [n, k/32]
    offset: np.ndarray | None = None  # float32 [n, k/32]: Q4_1's m + 8d
    dense: np.ndarray | None = None  # float32 [n, k] for F16/F32

    @property
    def bits(self) -> int:
        return {Q4_0: 4, Q4_1: 4, Q8_0: 8}.get(self.ggml_type, 0)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[..., start:start + 2]).view(np.float16)[..., 0].astype(np.float32)


def _nibbles_to_nbits(qs: np.ndarray) -> np.ndarray:
    """GGML nibble order (weight j<16: low nibble of byte j, j>=16: high nibble of byte j-16) to
    MatMulNBits order (byte i = weight 2i low | weight 2i+1 high)."""
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def unpack_weight(name: str, ggml_type: int, shape: Iterable[int], data: np.ndarray) -> Weight:
    """A GGUF tensor (shape as GGUF gives it: ne0 = k in, ne1 = n out) in MatMulNBits form."""
    k, n = (int(v) for v in shape)
    if ggml_type in (F32, F16):
        return Weight(name, ggml_type, n, k, dense=np.asarray(data, dtype=np.float32).reshape(n, k))
    if k % BLOCK:
        raise UnsupportedModel(f"{name}: input size {k} is not a multiple of {BLOCK}")
    kb = k // BLOCK
    raw = np.asarray(data, dtype=np.uint8)
    if ggml_type == Q4_0:
        blocks = raw.reshape(n, kb, 18)
        return Weight(name, ggml_type, n, k, packed=_nibbles_to_nbits(blocks[..., 2:]), scales=_f16(blocks, 0))
    if ggml_type == Q4_1:
        blocks = raw.reshape(n, kb, 20)
        d, m = _f16(blocks, 0), _f16(blocks, 2)
        return Weight(name, ggml_type, n, k, packed=_nibbles_to_nbits(blocks[..., 4:]), scales=d, offset=m + 8.0 * d)
    if ggml_type == Q8_0:
        blocks = raw.reshape(n, kb, 34)
        q = blocks[..., 2:].view(np.int8).astype(np.int16) + 128
        return Weight(name, ggml_type, n, k, packed=q.astype(np.uint8), scales=_f16(blocks, 0))
    raise UnsupportedModel(f"{name}: tensor type {ggml_type} is not one of Q4_0, Q4_1, Q8_0, F16, F32")


def dequantize(w: Weight) -> np.ndarray:
    """The float32 [n, k] matrix a Weight stands for (the MatMulNBits form read back)."""
    if w.dense is not None:
        return w.dense
    if w.bits == 4:
        q = np.stack([w.packed & 0x0F, w.packed >> 4], axis=-1).reshape(w.n, w.k // BLOCK, BLOCK).astype(np.float32)
        out = (q - 8.0) * w.scales[..., None]
        if w.offset is not None:
            out += w.offset[..., None]
    else:
        out = (w.packed.astype(np.float32) - 128.0) * w.scales[..., None]
    return out.reshape(w.n, w.k)


class GgufFile:
    """Metadata and tensors of a GGUF file (memory-mapped by GGUFReader)."""

    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        self.path = Path(path)
        self.reader = GGUFReader(str(self.path))
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        value = field.contents()
        return value

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise UnsupportedModel(f"{self.path.name}: GGUF field {key} is missing")
        return value

    def weight(self, name: str) -> Weight:
        t = self.tensors[name]
        return unpack_weight(name, int(t.tensor_type), t.shape, t.data)

    def vector(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        if int(t.tensor_type) not in (F32, F16):
            raise UnsupportedModel(f"{name}: a norm weight of type {t.tensor_type.name}")
        return np.asarray(t.data, dtype=np.float32).reshape(-1)


def model_facts(g: GgufFile) -> dict[str, Any]:
    """The hyper-parameters the graph and the engine need, from GGUF metadata."""
    arch = g.require("general.architecture")
    if arch != "llama":
        raise UnsupportedModel(f"{g.path.name}: architecture {arch!r}, only 'llama' is supported")
    n_embd = int(g.require(f"{arch}.embedding_length"))
    n_heads = int(g.require(f"{arch}.attention.head_count"))
    head_dim = int(g.get(f"{arch}.attention.key_length", n_embd // n_heads))
    rope_dim = int(g.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise UnsupportedModel(f"{g.path.name}: partial rotary ({rope_dim} of {head_dim}) is not supported")
    if head_dim % 16:
        raise UnsupportedModel(f"{g.path.name}: GroupQueryAttention's rotary needs a head size multiple of 16, not {head_dim}")
    if g.get(f"{arch}.rope.scaling.type") not in (None, "none"):
        raise UnsupportedModel(f"{g.path.name}: rope scaling {g.get(f'{arch}.rope.scaling.type')!r} is not supported")
    tokens = g.require("tokenizer.ggml.tokens")
    return {
        "architecture": arch,
        "name": g.get("general.name", g.path.stem),
        "n_layers": int(g.require(f"{arch}.block_count")),
        "n_embd": n_embd,
        "n_ff": int(g.require(f"{arch}.feed_forward_length")),
        "n_heads": n_heads,
        "n_kv_heads": int(g.get(f"{arch}.attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "context_length": int(g.require(f"{arch}.context_length")),
        "rope_base": float(g.get(f"{arch}.rope.freq_base", 10000.0)),
        "rms_eps": float(g.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab_size": len(tokens),
    }


# --------------------------------------------------------------------------- tokenizer

def build_tokenizer(g: GgufFile) -> Any:
    """A `tokenizers.Tokenizer` equal to llama.cpp's for the GGUF's byte-level BPE vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = g.require("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModel(f"{g.path.name}: tokenizer model {kind!r}, only byte-level BPE ('gpt2') is supported")
    tokens = list(g.require("tokenizer.ggml.tokens"))
    types = [int(t) for t in g.get("tokenizer.ggml.token_type", [1] * len(tokens))]
    merges = [tuple(m.split(" ", 1)) for m in g.require("tokenizer.ggml.merges")]
    pre = g.get("tokenizer.ggml.pre", "default")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # llama.cpp's "smollm": every digit alone, then GPT-2's split, no prefix space.
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt-2", "gpt2"):
        tok.pre_tokenizer = byte_level
    elif pre in ("llama-bpe", "llama3"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise UnsupportedModel(f"{g.path.name}: pre-tokenizer {pre!r} is not supported (smollm, gpt-2, llama-bpe are)")
    tok.decoder = decoders.ByteLevel()
    added = [AddedToken(tokens[i], special=types[i] == 3, normalized=False) for i in range(len(tokens)) if types[i] in (3, 4)]
    tok.add_tokens(added)
    return tok


def chat_facts(g: GgufFile, special: dict[str, Any]) -> dict[str, Any]:
    """Chat template, its form (decided here, so no request can fail on it later) and the default system
    message it inserts (if any). A template that is missing or does not render is refused."""
    from core.chat_template import TemplateError, template_form

    template = g.get("tokenizer.chat_template", "") or ""
    default_system = None
    # ChatML templates that insert a system turn when the conversation has none spell it out literally.
    found = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template, re.S)
    if found and "messages[0]" in template:
        default_system = found.group(1)
    tokens = g.require("tokenizer.ggml.tokens")
    bos = tokens[special["bos_id"]] if special["bos_id"] is not None else ""
    try:
        chat_format = template_form(template, default_system, bos, tokens[special["eos_id"]])
    except TemplateError as exc:
        raise UnsupportedModel(f"{g.path.name}: {exc}") from None
    return {"chat_template": template, "chat_format": chat_format, "default_system": default_system,
            "bos_token": bos, "eos_token": tokens[special["eos_id"]]}


def special_facts(g: GgufFile) -> dict[str, Any]:
    tokens = list(g.require("tokenizer.ggml.tokens"))
    types = [int(t) for t in g.get("tokenizer.ggml.token_type", [1] * len(tokens))]
    eos = int(g.require("tokenizer.ggml.eos_token_id"))
    bos = g.get("tokenizer.ggml.bos_token_id")
    eot = g.get("tokenizer.ggml.eot_token_id")
    stop = {eos} | ({int(eot)} if eot is not None else set())
    stop |= {i for i, t in enumerate(tokens) if types[i] == 3 and t in _END_TEXTS}
    return {
        "bos_id": int(bos) if bos is not None else None,
        "eos_id": eos,
        "stop_ids": sorted(stop),
        "add_bos": bool(g.get("tokenizer.ggml.add_bos_token", False)),
        "special_ids": [i for i, t in enumerate(types) if t == 3],
    }


# --------------------------------------------------------------------------- graph

class _Graph:
    """Node and initializer bookkeeping for onnx.helper."""

    def __init__(self):
        from onnx import helper

        self.helper = helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, array: np.ndarray, hint: str) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
        self.inits.append(tensor)
        return name

    def ints(self, values: list[int], hint: str = "shape") -> str:
        return self.const(np.asarray(values, dtype=np.int64), hint)

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", **attrs: Any) -> Any:
        outs = [self.name(op_type.lower()) for _ in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(self.helper.make_node(op_type, inputs, outs, domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def linear(self, x: str, weights: list[Weight], hint: str, out: str | None = None) -> str:
        """x @ W^T for one weight, or for several of the same type fused along the output axis;
        `out` names the result."""
        outs: int | list[str] = [out] if out else 1
        if len({w.ggml_type for w in weights}) > 1 or len({w.k for w in weights}) > 1:
            return self.op("Concat", [self.linear(x, [w], f"{hint}{i}") for i, w in enumerate(weights)], outs, axis=-1)
        first = weights[0]
        n, k = sum(w.n for w in weights), first.k
        if first.dense is not None:
            w_t = np.concatenate([w.dense for w in weights], axis=0).T
            return self.op("MatMul", [x, self.const(w_t, f"{hint}_w")], outs)
        packed = np.concatenate([w.packed for w in weights], axis=0)
        scales = np.concatenate([w.scales for w in weights], axis=0)
        y = self.op("MatMulNBits", [x, self.const(packed, f"{hint}_b"), self.const(scales, f"{hint}_s")],
                    outs if first.offset is None else 1, domain="com.microsoft", K=k, N=n, bits=first.bits, block_size=BLOCK,
                    accuracy_level=4)
        if first.offset is None:
            return y
        # Q4_1: add sum over blocks of (block sum of x) * (m + 8d). The block means come from one
        # AveragePool over x seen as [1, channels=S, length=k] (fewer nodes than Reshape + ReduceSum:
        # per-node overhead dominates at one token), and the 32 of mean = sum/32 goes into the
        # constant; both scalings by a power of two are exact.
        offset_t = np.concatenate([w.offset for w in weights], axis=0).T * np.float32(BLOCK)  # [k/32, n]
        means = self.op("AveragePool", [x], kernel_shape=[BLOCK], strides=[BLOCK])
        return self.op("Add", [y, self.op("MatMul", [means, self.const(offset_t.astype(np.float32), f"{hint}_c")])], outs)

    def model(self, inputs: list, outputs: list) -> Any:
        h = self.helper
        graph = h.make_graph(self.nodes, "llama", inputs, outputs, self.inits)
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)],
                             producer_name="unitbus.models.gguf_llama")
        model.ir_version = 9
        return model


def build_graph(g: GgufFile, facts: dict[str, Any], progress: bool = True,
                report: Callable[[int], None] | None = None) -> tuple[Any, Weight]:
    """The onnx ModelProto for a llama GGUF (layout in the module docstring), and the token table.
    `report(percent)` follows the layers (0..90: the rest is writing the files)."""
    from onnx import TensorProto as TP
    from onnx import helper
    from tqdm import tqdm

    nl, nh, nkv, hd = facts["n_layers"], facts["n_heads"], facts["n_kv_heads"], facts["head_dim"]
    n_embd, n_ff, vocab, eps = facts["n_embd"], facts["n_ff"], facts["vocab_size"], facts["rms_eps"]
    gr = _Graph()
    ms = "com.microsoft"

    embd = g.weight("token_embd.weight")
    x = "inputs_embeds"

    inv_freq = 1.0 / (facts["rope_base"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    angles = np.outer(np.arange(facts["context_length"], dtype=np.float64), inv_freq)
    cos = gr.const(np.cos(angles).astype(np.float32), "cos_cache")
    sin = gr.const(np.sin(angles).astype(np.float32), "sin_cache")

    inputs = [
        helper.make_tensor_value_info("inputs_embeds", TP.FLOAT, [1, "sequence", n_embd]),
        helper.make_tensor_value_info("seqlens_k", TP.INT32, [1]),
        helper.make_tensor_value_info("total_sequence_length", TP.INT32, []),
        helper.make_tensor_value_info("num_logits_to_keep", TP.INT64, [1]),
    ]
    outputs = []
    h = gr.op("SimplifiedLayerNormalization", [x, gr.const(g.vector("blk.0.attn_norm.weight"), "attn_norm")],
              axis=-1, epsilon=eps)
    for i in tqdm(range(nl), desc="layers", disable=not progress, unit="layer"):
        if report is not None:
            report(90 * i // nl)
        p = f"blk.{i}."
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        present_k, present_v = f"present.{i}.key", f"present.{i}.value"
        for name in (past_k, past_v):
            inputs.append(helper.make_tensor_value_info(name, TP.FLOAT, [1, nkv, "capacity", hd]))
        for name in (present_k, present_v):
            outputs.append(helper.make_tensor_value_info(name, TP.FLOAT, [1, nkv, "capacity", hd]))
        qkv = gr.linear(h, [g.weight(p + "attn_q.weight"), g.weight(p + "attn_k.weight"), g.weight(p + "attn_v.weight")], f"l{i}_qkv")
        attn = gr.op("GroupQueryAttention", [qkv, "", "", past_k, past_v, "seqlens_k", "total_sequence_length", cos, sin],
                     [gr.name("attn"), present_k, present_v], domain=ms,
                     num_heads=nh, kv_num_heads=nkv, do_rotary=1, rotary_interleaved=1, scale=float(hd) ** -0.5)[0]
        o = gr.linear(attn, [g.weight(p + "attn_output.weight")], f"l{i}_o")
        h2, _, _, x = gr.op("SkipSimplifiedLayerNormalization", [o, x, gr.const(g.vector(p + "ffn_norm.weight"), "ffn_norm")],
                            [gr.name("h"), "", "", gr.name("mid")], domain=ms, epsilon=eps)
        gate_up = gr.linear(h2, [g.weight(p + "ffn_gate.weight"), g.weight(p + "ffn_up.weight")], f"l{i}_gu")
        gate, up = gr.op("Split", [gate_up, gr.ints([n_ff, n_ff], "split")], 2, axis=-1)
        act = gr.op("Mul", [gr.op("QuickGelu", [gate], domain=ms, alpha=1.0), up])  # SiLU(gate) * up
        down = gr.linear(act, [g.weight(p + "ffn_down.weight")], f"l{i}_down")
        next_norm = g.vector(f"blk.{i + 1}.attn_norm.weight") if i + 1 < nl else g.vector("output_norm.weight")
        last_layer = i + 1 == nl
        # Hugging Face numbering: hidden state l is the residual stream after layer l, except the last,
        # which is the final-normed one.
        h, _, _, x = gr.op("SkipSimplifiedLayerNormalization", [down, x, gr.const(next_norm, "norm")],
                           [f"hidden_states.{nl}" if last_layer else gr.name("h"), "",
                            "", "" if last_layer else f"hidden_states.{i + 1}"], domain=ms, epsilon=eps)

    last = gr.op("Slice", [h, gr.op("Neg", ["num_logits_to_keep"]), gr.ints([np.iinfo(np.int64).max], "ends"), gr.ints([1], "axes")])
    head = g.weight("output.weight") if "output.weight" in g.tensors else embd
    if head.n != vocab:
        raise UnsupportedModel(f"output head has {head.n} rows for a vocabulary of {vocab}")
    gr.linear(last, [head], "head", out="logits")
    outputs.insert(0, helper.make_tensor_value_info("logits", TP.FLOAT, [1, "kept", vocab]))
    for layer in range(1, nl + 1):
        outputs.append(helper.make_tensor_value_info(f"hidden_states.{layer}", TP.FLOAT, [1, "sequence", n_embd]))
    return gr.model(inputs, outputs), embd


def save_embeddings(embd: Weight, path: Path) -> dict[str, Any]:
    """The token table as rows the engine can pread (format in the module docstring)."""
    if embd.dense is not None:
        path.write_bytes(np.ascontiguousarray(embd.dense, dtype=np.float32).tobytes())
        return {"file": path.name, "format": "float32", "row_bytes": embd.k * 4}
    kb = embd.k // BLOCK
    if embd.bits == 8:
        q = (embd.packed.astype(np.int16) - 128).astype(np.int8).reshape(embd.n, embd.k)
    else:
        q = np.stack([embd.packed & 0x0F, embd.packed >> 4], axis=-1).reshape(embd.n, embd.k).astype(np.int8)
        q -= 8  # MatMulNBits form stores w = d*(q-8) (+ offset)
    offset = embd.offset if embd.offset is not None else np.zeros((embd.n, kb), np.float32)
    rows = np.concatenate([q.view(np.uint8), embd.scales.astype(np.float32).view(np.uint8),
                           offset.astype(np.float32).view(np.uint8)], axis=1)
    path.write_bytes(np.ascontiguousarray(rows).tobytes())
    return {"file": path.name, "format": "int8_blocks", "row_bytes": rows.shape[1], "block": BLOCK}


def save_model(model: Any, out_dir: Path) -> None:
    """model.onnx + model.onnx.data, memory-mapped by onnxruntime (models/onnx_graph.py)."""
    from models.onnx_graph import save_with_external_data

    save_with_external_data(model, out_dir / "model.onnx")


# --------------------------------------------------------------------------- cache

REQUIRED = ("model.onnx", "model.onnx.data", "config.json", "tokenizer.json", "tokenizer.npz", "token_embd.bin")


def stamp(gguf_path: Path) -> dict[str, Any]:
    from models.cache import source_stamp

    return source_stamp([gguf_path], CONVERTER_VERSION)


def cache_is_current(out_dir: Path, gguf_path: Path) -> bool:
    from models.cache import is_current

    return is_current(out_dir, stamp(gguf_path), REQUIRED)


def default_out_dir(gguf_path: Path) -> Path:
    """cache_dir()/<GGUF file name without .gguf>: the file names the model and its quantization, so the
    engine (given only the path) and `convert_manifest` land on the same folder."""
    from core.paths import cache_dir

    return cache_dir() / gguf_path.stem


def convert(gguf_path: Path, out_dir: Path, progress: bool = True, report: Callable[[int], None] | None = None) -> None:
    """Write the converted model into out_dir (an empty folder, made if missing); `report(percent)` as it goes."""
    g = GgufFile(gguf_path)
    facts = model_facts(g)
    types = {_TYPE_NAMES.get(int(t.tensor_type), t.tensor_type.name) for t in g.reader.tensors if len(t.shape) == 2}
    if "rope_freqs.weight" in g.tensors:
        raise UnsupportedModel(f"{gguf_path.name}: per-dimension rope frequency factors (llama 3.1 style) are not supported")
    unsupported = types - set(_TYPE_NAMES.values())
    if unsupported:
        raise UnsupportedModel(f"{gguf_path.name}: tensor types {sorted(unsupported)} (supported: Q4_0, Q4_1, Q8_0, F16, F32)")
    special = special_facts(g)
    chat = chat_facts(g, special)
    tokenizer = build_tokenizer(g)
    model, embd = build_graph(g, facts, progress=progress, report=report)
    if report is not None:
        report(90)
    out_dir.mkdir(parents=True, exist_ok=True)
    embedding = save_embeddings(embd, out_dir / "token_embd.bin")
    config = {**facts, **special, **chat, "embedding": embedding, "weight_types": sorted(types),
              "source": str(gguf_path)}
    tokenizer.save(str(out_dir / "tokenizer.json"))
    from models.bpe_tables import save_bpe

    save_bpe(out_dir / "tokenizer.json", out_dir / "tokenizer.npz")
    save_model(model, out_dir)
    (out_dir / "config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False))
    if report is not None:
        report(100)


def ensure_converted(gguf_path: str | Path, out_root: str | Path | None = None, progress: bool = True,
                     force: bool = False, report: Callable[[int], None] | None = None) -> Path:
    """The folder holding model.onnx (+ model.onnx.data), the tokenizer and config.json for a GGUF,
    converted once (models/cache.py: reused while the GGUF's size, mtime and the converter are the same);
    `report(percent)` follows a conversion when one is needed."""
    from models.cache import build_once

    gguf_path = Path(gguf_path).resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    out_dir = Path(out_root) if out_root is not None else default_out_dir(gguf_path)
    if not force and cache_is_current(out_dir, gguf_path):
        return out_dir
    log.info("converting %s to %s (once; later loads reuse it)", gguf_path.name, out_dir)
    return build_once(out_dir, stamp(gguf_path), lambda folder: convert(gguf_path, folder, progress, report),
                      REQUIRED, force=force)


def gguf_path_of(mode_param: dict[str, Any]) -> Path:
    """The GGUF a manifest's mode_param names: `pkg://<package>/<file>` or an absolute path."""
    ref = mode_param.get("gguf")
    if not ref:
        raise ValueError("mode_param has no 'gguf' entry")
    if str(ref).startswith("pkg://"):
        from core.paths import resolve_pkg_url

        return resolve_pkg_url(str(ref))
    path = Path(ref)
    if not path.is_absolute():
        raise ValueError(f"gguf reference {ref!r} must be pkg://... or an absolute path")
    return path


def convert_manifest(manifest: dict[str, Any], force: bool = False, progress: bool = True) -> Path:
    """Convert the GGUF an llm manifest names; returns the cache folder (the one the engine uses)."""
    return ensure_converted(gguf_path_of(manifest.get("mode_param", {})), progress=progress, force=force)
