"""The llm engine: a llama GGUF converted to one onnxruntime graph (models/gguf_llama.py), generation,
scoring and embeddings. numpy/onnxruntime/regex only: no bus, no asyncio.

One loaded LlmEngine serves many generations at once from different threads: the session and the
tokenizer are read-only, and each generation owns its KV cache and its IOBinding.

Speed: the KV cache lives in numpy arrays bound once to both the past and the present inputs of
GroupQueryAttention (its shared-buffer mode), so a decode step copies no cache and binds nothing new;
the step writes three integers, runs, and reads the logits from a preallocated buffer.
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from units.llm.sampler import Sampler
from core.chat_template import JinjaTemplate, chatml_prompt, tool_messages
from core.runtime import return_memory_to_os
from units.llm.tokenizer import TextAssembler, TextTokenizer

log = logging.getLogger(__name__)

# Prompt tokens per graph run: bounds the attention scratch ([heads, chunk, context] floats).
PREFILL_CHUNK = 256
# The KV cache grows by half its size, in multiples of this many positions, so a short chat does not
# pay for the whole context window (and a long one copies the cache a logarithmic number of times).
KV_STEP = 64
# Deltas are emitted every this many tokens (StackFlow's rhythm, unit-protocol.md §10.2).
TOKENS_PER_DELTA = 3


class ContextOverflow(ValueError):
    """The prompt does not fit the context window."""


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_ms: float = 0.0
    decode_ms: float = 0.0


@dataclass
class ScoreResult:
    """Log-probabilities of a continuation's tokens after a context."""

    tokens: list[int]
    logprobs: list[float]

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per token (what Ai00's `chooses` calls perplexity)."""
        return -float(np.mean(self.logprobs)) if self.logprobs else 0.0

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


class EmbeddingRows:
    """Token embeddings read from the converter's token_embd.bin with pread: only the rows in use are
    ever in memory. Rows are int8 q with an fp32 scale and offset per block (row = q*scale + offset),
    or plain float32."""

    def __init__(self, path: Path, spec: Mapping[str, Any], width: int):
        self.width = width
        self.row_bytes = int(spec["row_bytes"])
        self.blocked = spec["format"] == "int8_blocks"
        self.block = int(spec.get("block", 32))
        self._fd = os.open(path, os.O_RDONLY)

    def lookup(self, ids: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """Rows for ids as float32 [len(ids), width] (into `out` if given)."""
        raw = np.frombuffer(b"".join(os.pread(self._fd, self.row_bytes, int(i) * self.row_bytes) for i in ids),
                            np.uint8).reshape(len(ids), self.row_bytes)
        if out is None:
            out = np.empty((len(ids), self.width), np.float32)
        if not self.blocked:
            out[...] = raw.view(np.float32)
            return out
        kb = self.width // self.block
        q = raw[:, :self.width].view(np.int8).reshape(len(ids), kb, self.block)
        scale = raw[:, self.width:self.width + 4 * kb].view(np.float32)[..., None]
        offset = raw[:, self.width + 4 * kb:].view(np.float32)[..., None]
        np.add(q * scale, offset, out=out.reshape(len(ids), kb, self.block))
        return out

    def close(self) -> None:
        os.close(self._fd)


class _Sequence:
    """One token sequence's KV cache and IOBinding over the shared session."""

    def __init__(self, engine: "LlmEngine", capacity: int):
        self.engine = engine
        self.length = 0
        cfg = engine.config
        self._shape = (1, cfg["n_kv_heads"], 0, cfg["head_dim"])
        self.binding = engine.session.io_binding()
        self._seqlens = np.zeros(1, np.int32)
        self._total = np.zeros((), np.int32)
        self._keep = np.ones(1, np.int64)
        self._one = np.zeros((1, 1, cfg["n_embd"]), np.float32)
        self._embeds: np.ndarray | None = None
        self._logits: np.ndarray | None = None
        self._hidden: tuple[str, np.ndarray] | None = None
        b = self.binding
        b.bind_input("seqlens_k", "cpu", 0, np.int32, [1], self._seqlens.ctypes.data)
        b.bind_input("total_sequence_length", "cpu", 0, np.int32, [], self._total.ctypes.data)
        b.bind_input("num_logits_to_keep", "cpu", 0, np.int64, [1], self._keep.ctypes.data)
        self.cache: list[np.ndarray] = []
        self._resize(capacity)

    @property
    def capacity(self) -> int:
        return self.cache[0].shape[2]

    def _resize(self, capacity: int) -> None:
        shape = (*self._shape[:2], capacity, self._shape[3])
        old, self.cache = self.cache, [np.zeros(shape, np.float32) for _ in range(2 * self.engine.config["n_layers"])]
        for i, arr in enumerate(self.cache):
            if old:
                arr[:, :, :self.length] = old[i][:, :, :self.length]
            name = f"{i // 2}.{'value' if i % 2 else 'key'}"
            # Past and present are the same memory: GroupQueryAttention then appends in place.
            self.binding.bind_input(f"past_key_values.{name}", "cpu", 0, np.float32, shape, arr.ctypes.data)
            self.binding.bind_output(f"present.{name}", "cpu", 0, np.float32, shape, arr.ctypes.data)

    def _bind_embeds(self, embeds: np.ndarray) -> None:
        if self._embeds is not embeds:
            self.binding.bind_input("inputs_embeds", "cpu", 0, np.float32, list(embeds.shape), embeds.ctypes.data)
            self._embeds = embeds

    def _bind_logits(self, keep: int) -> np.ndarray:
        if self._logits is None or self._logits.shape[1] != keep:
            self._logits = np.empty((1, keep, self.engine.vocab_size), np.float32)
            self.binding.bind_output("logits", "cpu", 0, np.float32, list(self._logits.shape), self._logits.ctypes.data)
        return self._logits

    def run(self, ids: Sequence[int], keep: int = 1, hidden_layer: int | None = None) -> np.ndarray:
        """Feed token ids after the cached ones; logits [keep, vocab] of the last `keep` positions.
        With hidden_layer (1..n_layers), self.hidden holds that layer's states [S, width] afterwards."""
        return self._run(self.engine.embeddings.lookup(ids)[None], keep, hidden_layer)

    def _run(self, embeds: np.ndarray, keep: int = 1, hidden_layer: int | None = None) -> np.ndarray:
        n = embeds.shape[1]
        if self.length + n > self.capacity:
            limit = self.engine.context_length
            want = max(self.length + n, min(self.capacity + max(KV_STEP, self.capacity // 2), limit))
            self._resize(min(limit, -(-want // KV_STEP) * KV_STEP))
        self._bind_embeds(embeds)
        logits = self._bind_logits(keep)
        if hidden_layer is not None:
            buf = np.empty((1, n, self.engine.config["n_embd"]), np.float32)
            self.binding.bind_output(f"hidden_states.{hidden_layer}", "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
            self._hidden = (f"hidden_states.{hidden_layer}", buf)
        self._keep[0] = keep
        self._seqlens[0] = self.length + n - 1
        self._total[...] = self.length + n
        # A prompt chunk's scratch leaves onnxruntime's pool at the end of its run: the pool would keep
        # the largest chunk's, where a decode step needs little (bench_llm.py: 208.6 -> 202.7 MB resident;
        # without a pool at all 201 MB, but every prompt chunk then allocates anew: the first token came
        # 4-23 ms later in two runs).
        self.engine.session.run_with_iobinding(self.binding, self.engine.shrink_pool if n > 1 else None)
        self.length += n
        return logits[0]

    @property
    def hidden(self) -> np.ndarray:
        return self._hidden[1][0]

    def step(self, token: int) -> np.ndarray:
        """One decode step: logits [vocab] after `token` (a view, valid until the next run)."""
        self.engine.embeddings.lookup((token,), out=self._one[0])
        return self._run(self._one)[0]

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Feed a prompt in chunks; logits [vocab] after its last token."""
        logits = None
        for start in range(0, len(ids), PREFILL_CHUNK):
            logits = self.run(ids[start:start + PREFILL_CHUNK])
        return logits[0]


class Generation:
    """An iterator of text deltas; after it ends: finish_reason ("stop", "length", "cancelled"),
    usage, tokens (the generated ids, without the end token) and text (everything emitted)."""

    def __init__(self, engine: "LlmEngine", prompt_ids: Sequence[int], sampler: Sampler, max_new_tokens: int,
                 stop: Sequence[str], cancel: threading.Event | None, constraint: Any = None):
        self.finish_reason: str | None = None
        self.usage = Usage(prompt_tokens=len(prompt_ids))
        self.tokens: list[int] = []
        self.text = ""
        self._run = self._generate(engine, list(prompt_ids), sampler, max_new_tokens, stop, cancel, constraint)

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> str:
        delta = next(self._run)
        self.text += delta
        return delta

    def close(self) -> None:
        """Stop early (as if cancelled) and release the KV cache."""
        self._run.close()

    def __enter__(self) -> "Generation":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _generate(self, engine: "LlmEngine", prompt: list[int], sampler: Sampler, max_new: int,
                  stop: Sequence[str], cancel: threading.Event | None, constraint: Any) -> Iterator[str]:
        usage = self.usage
        text = TextAssembler(stop)
        stop_ids = engine.stop_ids
        piece = engine.tokenizer.piece
        specials = engine.tokenizer.special_ids
        max_new = max(0, min(max_new, engine.context_length - len(prompt)))
        try:
            t0 = time.perf_counter()
            seq = _Sequence(engine, min(engine.context_length, -(-(len(prompt) + min(max_new, KV_STEP)) // KV_STEP) * KV_STEP))
            logits = seq.prefill(prompt)
            sampler.start(prompt)
            clock = time.perf_counter()
            usage.prompt_ms = (clock - t0) * 1000.0
            pending = 0
            while True:
                if cancel is not None and cancel.is_set():
                    self.finish_reason = "cancelled"
                    break
                if len(self.tokens) >= max_new:
                    self.finish_reason = "length"
                    break
                if constraint is not None:
                    # Masked before the sampler, so bias, penalties and the cut-offs only see allowed tokens.
                    constraint.apply(logits)
                    token = sampler.sample(logits)
                    if not constraint.allows(token):  # a float rounding edge of the draw: take the best allowed
                        token = int(np.argmax(logits))
                else:
                    token = sampler.sample(logits)
                if token in stop_ids:
                    self.finish_reason = "stop"
                    break
                if constraint is not None:
                    constraint.accept(token)
                sampler.accept(token)
                self.tokens.append(token)
                usage.completion_tokens = len(self.tokens)
                # Control tokens other than the end ones are not text (llama.cpp renders them empty).
                done = constraint is not None and constraint.finished  # nothing but an end token may follow
                if text.add(b"" if token in specials else piece(token)) or done:
                    self.finish_reason = "stop"
                    break
                pending += 1
                if pending >= TOKENS_PER_DELTA:
                    delta = text.take()
                    if delta:
                        pending = 0
                        usage.decode_ms += (time.perf_counter() - clock) * 1000.0
                        yield delta
                        clock = time.perf_counter()
                if len(self.tokens) < max_new and not (cancel is not None and cancel.is_set()):
                    logits = seq.step(token)
            usage.decode_ms += (time.perf_counter() - clock) * 1000.0
            rest = text.take() + text.finish()
            if rest:
                yield rest
        finally:
            if self.finish_reason is None:
                self.finish_reason = "cancelled"  # the consumer closed the iterator early
            seq = None  # drop the KV cache first, then hand the freed memory back
            return_memory_to_os()


class LlmEngine:
    """A loaded model. Thread-safe: every call builds its own per-sequence state."""

    def __init__(self, model_dir: str | Path, threads: int | None = None, context_length: int | None = None,
                 spin: bool = True):
        """`spin`: onnxruntime's worker threads spin between ops (the fastest decode on cores of its own);
        off, they sleep, leaving the cores to the other units between ops."""
        from core.runtime import create_session

        self.model_dir = Path(model_dir)
        self.config: dict[str, Any] = json.loads((self.model_dir / "config.json").read_text())
        t0 = time.perf_counter()
        self.tokenizer = TextTokenizer(self.model_dir / "tokenizer.npz", self.config["special_ids"])
        return_memory_to_os()  # before the session allocates on top of the parser's freed memory
        self.session = create_session(self.model_dir / "model.onnx", threads=threads,
                                      options=None if spin else {"session.intra_op.allow_spinning": "0"})
        return_memory_to_os((self.model_dir / "model.onnx.data").resolve())
        import onnxruntime as ort

        self.shrink_pool = ort.RunOptions()
        self.shrink_pool.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        spec = self.config["embedding"]
        self.embeddings = EmbeddingRows(self.model_dir / spec["file"], spec, int(self.config["n_embd"]))
        self.load_ms = (time.perf_counter() - t0) * 1000.0
        model_ctx = int(self.config["context_length"])
        self.context_length = min(int(context_length), model_ctx) if context_length else model_ctx
        self.vocab_size = int(self.config["vocab_size"])
        self.stop_ids = frozenset(self.config["stop_ids"])
        self.eos_id = int(self.config["eos_id"])
        self.bos_id = self.config.get("bos_id")
        self._template = None
        if self.config.get("chat_format") == "jinja":
            # The engine adds BOS itself when the model wants it: the template must not write it again.
            bos = "" if self.config.get("add_bos") else self.config.get("bos_token", "")
            self._template = JinjaTemplate(self.config["chat_template"], bos, self.config.get("eos_token", ""))
        log.info("llm %s loaded in %.0f ms (context %d)", self.config.get("name"), self.load_ms, self.context_length)

    def close(self) -> None:
        """Release the token table's file; the session goes with the last reference to the engine."""
        self.embeddings.close()

    # ------------------------------------------------------------------ text

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of text (special-token texts become their ids), with BOS first if add_bos, or by
        default when the model asks for one (SmolLM2 does not)."""
        ids = self.tokenizer.encode(text)
        if (self.config.get("add_bos") if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, int(self.bos_id))
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special=skip_special)

    @property
    def default_system(self) -> str | None:
        """The system message the model's chat template inserts when a conversation has none."""
        return self.config.get("default_system")

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]], system_default: str | None = None,
                    add_generation_prompt: bool = True, tools: Sequence[Mapping[str, Any]] = ()) -> str:
        """The chat template applied to messages ({role, content}, assistant `tool_calls`, `tool` results).
        Without a system message first, `system_default` is inserted (None: the template's own default;
        "": no system turn). `tools` ({name, description, parameters}) are offered to the model."""
        if tools or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages):
            # Neither SmolLM2's template nor ChatML knows tools: they are written out as plain turns.
            system = self.default_system if system_default is None else system_default
            messages = tool_messages(messages, tools, system)
        if self.config.get("chat_format") == "chatml":
            system = self.default_system if system_default is None else system_default
            return chatml_prompt(messages, system, add_generation_prompt)
        # The model's own template (decided at conversion): it inserts its own default system turn.
        if system_default and (not messages or messages[0].get("role") != "system"):
            messages = [{"role": "system", "content": system_default}, *messages]
        if self._template is None:
            raise ValueError(f"chat format {self.config.get('chat_format')!r}: convert the model again")
        return self._template.render(messages, add_generation_prompt)

    # ------------------------------------------------------------------ generation

    def check_prompt(self, prompt_ids: Sequence[int]) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.context_length:
            raise ContextOverflow(f"prompt of {len(prompt_ids)} tokens does not fit the context of {self.context_length}")
        bad = [i for i in prompt_ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range: {bad[:5]}")

    def generate(self, prompt_ids: Sequence[int], sampler: Sampler | None = None, max_new_tokens: int = 256,
                 stop: Sequence[str] = (), cancel: threading.Event | None = None, constraint: Any = None) -> Generation:
        """Text deltas (about every 3 tokens, never a split UTF-8 character, never a stop string or a
        prefix of one that may still complete) until an end token, a stop string, max_new_tokens, the
        context limit or `cancel`. Nothing runs until the first next().

        `constraint` (a grammar.GrammarConstraint, fresh per generation) restricts every step to the
        tokens its grammar allows and ends the generation ("stop") once the grammar is complete."""
        self.check_prompt(prompt_ids)
        return Generation(self, prompt_ids, sampler or Sampler(temperature=0.0), max_new_tokens, stop, cancel,
                          constraint)

    # ------------------------------------------------------------------ scoring and embeddings

    def score(self, text: str, continuation: str) -> ScoreResult:
        """Log-probability of each token of `continuation` after `text` (tokenized separately, so the
        continuation's tokens are the same for every context). An empty text scores after BOS."""
        context = self.encode(text) if text else ([int(self.bos_id)] if self.bos_id is not None else [])
        cont = self.encode(continuation, add_bos=False)
        if not context or not cont:
            raise ValueError("score needs a non-empty continuation and a context (or a BOS token)")
        ids = context + cont
        self.check_prompt(ids)
        seq = _Sequence(self, -(-len(ids) // KV_STEP) * KV_STEP)
        rows = []
        first_needed = len(context) - 1  # the position whose logits predict the first continuation token
        for start in range(0, len(ids), PREFILL_CHUNK):
            chunk = ids[start:start + PREFILL_CHUNK]
            end = start + len(chunk)
            keep = max(1, end - max(start, first_needed))
            logits = seq.run(chunk, keep)
            if end > first_needed:
                rows.append(np.array(logits[-(end - max(start, first_needed)):], dtype=np.float64))
        logits = np.concatenate(rows)[:len(cont)]
        logits -= logits.max(axis=1, keepdims=True)
        logprobs = logits[np.arange(len(cont)), cont] - np.log(np.exp(logits).sum(axis=1))
        return ScoreResult(tokens=cont, logprobs=[float(v) for v in logprobs])

    def perplexity(self, text: str, continuation: str) -> float:
        return self.score(text, continuation).perplexity

    def embed(self, text: str, layer: int = -1, pooling: str = "mean") -> np.ndarray:
        """A float32 vector for text: the hidden state at `layer` (0: token embeddings, 1..n-1: after
        that layer, n or -1: after the final norm), averaged over tokens ("mean") or of the last token."""
        n = int(self.config["n_layers"])
        index = layer if layer >= 0 else n + 1 + layer
        if not 0 <= index <= n:
            raise ValueError(f"layer {layer} is outside -{n + 1}..{n}")
        if pooling not in ("mean", "last"):
            raise ValueError("pooling is 'mean' or 'last'")
        ids = self.encode(text)
        self.check_prompt(ids)
        if index == 0:
            states = self.embeddings.lookup(ids)
            return states[-1].copy() if pooling == "last" else states.mean(axis=0, dtype=np.float64).astype(np.float32)
        seq = _Sequence(self, -(-len(ids) // KV_STEP) * KV_STEP)
        total = np.zeros(self.config["n_embd"], np.float64)
        for start in range(0, len(ids), PREFILL_CHUNK):
            seq.run(ids[start:start + PREFILL_CHUNK], 1, hidden_layer=index)
            total += seq.hidden.sum(axis=0)
        vector = seq.hidden[-1] if pooling == "last" else total / len(ids)
        return np.asarray(vector, dtype=np.float32)


def load_llm(params: Mapping[str, Any], report: Callable[[int], None] | None = None) -> LlmEngine:
    """An engine from a manifest's merged mode_param: "gguf" (pkg://... or an absolute path; converted
    once into the cache, `report(percent)` following a conversion) or "model_dir" (an already converted
    folder), "context_length", "threads", "spin" (default true)."""
    if params.get("model_dir"):
        model_dir = Path(params["model_dir"])
    else:
        from models.gguf_llama import ensure_converted, gguf_path_of

        model_dir = ensure_converted(gguf_path_of(params), progress=False, report=report)
    threads = int(params["threads"]) if params.get("threads") else None
    ctx = int(params["context_length"]) if params.get("context_length") else None
    return LlmEngine(model_dir, threads=threads, context_length=ctx, spin=bool(params.get("spin", True)))
