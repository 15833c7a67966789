"""A plain numpy llama forward pass over the dequantized GGUF weights: the yardstick for the graph.

Written from the GGML block formats and the llama architecture alone; it shares no code with the
converter, so a mistake there (nibble order, zero points, rotary layout) shows up as a mismatch here.
"""
from __future__ import annotations

import numpy as np


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def dequantize(tensor) -> np.ndarray:
    """A GGUFReader tensor as float32 [rows, cols] (rows = output features)."""
    kind = tensor.tensor_type.name
    if kind in ("F32", "F16"):
        return np.asarray(tensor.data, dtype=np.float32)
    cols = int(tensor.shape[0])
    raw = np.asarray(tensor.data, dtype=np.uint8).reshape(-1)
    if kind == "Q8_0":
        blocks = raw.reshape(-1, 34)
        values = _f16(blocks[:, 0:2])[:, None] * blocks[:, 2:].view(np.int8).astype(np.float32)
    elif kind in ("Q4_0", "Q4_1"):
        size = 18 if kind == "Q4_0" else 20
        blocks = raw.reshape(-1, size)
        qs = blocks[:, size - 16:]
        q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float32)  # weights 0..15 low, 16..31 high
        d = _f16(blocks[:, 0:2])[:, None]
        values = d * (q - 8.0) if kind == "Q4_0" else d * q + _f16(blocks[:, 2:4])[:, None]
    else:
        raise ValueError(kind)
    return values.reshape(-1, cols)


class NumpyLlama:
    def __init__(self, gguf_path: str):
        from gguf import GGUFReader

        reader = GGUFReader(gguf_path)
        f = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("tokenizer.")}
        self.n_layers = int(f["llama.block_count"])
        self.n_heads = int(f["llama.attention.head_count"])
        self.n_kv = int(f["llama.attention.head_count_kv"])
        self.dim = int(f["llama.embedding_length"])
        self.head_dim = self.dim // self.n_heads
        self.eps = float(f["llama.attention.layer_norm_rms_epsilon"])
        self.base = float(f["llama.rope.freq_base"])
        self.w = {t.name: dequantize(t) for t in reader.tensors}

    def _norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * weight

    def _rope(self, x: np.ndarray) -> np.ndarray:
        """x [heads, T, head_dim]; GGUF q/k rows are permuted so that pairs (2i, 2i+1) rotate together."""
        t = np.arange(x.shape[1])[:, None]
        freq = self.base ** (-np.arange(0, self.head_dim, 2) / self.head_dim)
        cos, sin = np.cos(t * freq), np.sin(t * freq)
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = even * cos - odd * sin
        out[..., 1::2] = even * sin + odd * cos
        return out

    def forward(self, ids: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits [T, vocab] and the hidden states (embeddings, after each layer, final-normed)."""
        w, hd, T = self.w, self.head_dim, len(ids)
        x = w["token_embd.weight"][ids].astype(np.float64)
        hidden = [x]
        mask = np.triu(np.full((T, T), -np.inf), 1)
        group = self.n_heads // self.n_kv
        for i in range(self.n_layers):
            p = f"blk.{i}."
            h = self._norm(x, w[p + "attn_norm.weight"])
            q = (h @ w[p + "attn_q.weight"].T).reshape(T, self.n_heads, hd).transpose(1, 0, 2)
            k = (h @ w[p + "attn_k.weight"].T).reshape(T, self.n_kv, hd).transpose(1, 0, 2)
            v = (h @ w[p + "attn_v.weight"].T).reshape(T, self.n_kv, hd).transpose(1, 0, 2)
            q, k = self._rope(q), self._rope(k)
            k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
            scores = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            att = (scores / scores.sum(-1, keepdims=True)) @ v
            x = x + att.transpose(1, 0, 2).reshape(T, -1) @ w[p + "attn_output.weight"].T
            h = self._norm(x, w[p + "ffn_norm.weight"])
            gate = h @ w[p + "ffn_gate.weight"].T
            x = x + ((gate / (1 + np.exp(-gate))) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
            hidden.append(x)
        h = self._norm(x, w["output_norm.weight"])
        hidden[-1] = h
        head = w.get("output.weight", w["token_embd.weight"])
        return h @ head.T, hidden
