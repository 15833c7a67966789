"""The llm unit (spec §16.1): StackFlow text generation plus the llm.chat_completion, llm.score and
llm.embed extensions the HTTP gateways use. Protocol only: the model work is in engine.py."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from core.errors import ErrorCode, UnitError
from core.unit import Job, Task, Unit
from units.llm import UNIT
from units.llm.engine import ContextOverflow, LlmEngine, load_llm
from units.llm.sampler import Sampler, params_from_request
from units.llm.tools import ToolRequest, is_call, parse_calls, tool_request

log = logging.getLogger(__name__)

RESET_WORD = "reset"
RESET_ANSWER = "Context has been reset."
# Request keys of llm.chat_completion that change sampling for one request (spec §11.3).
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty", "penalty_window",
                 "presence_penalty", "frequency_penalty", "penalty_decay", "seed", "logit_bias", "sampler")
UNSUPPORTED_KEYS = ("images",)
# Request keys asking for constrained decoding (units/llm/grammar.py); models need the "grammar" capability.
GRAMMAR_KEYS = ("format", "grammar")


@dataclass
class LlmState:
    engine: LlmEngine
    history: list[dict[str, Any]] = field(default_factory=list)  # the conversation kept by keep_context


class LlmUnit(Unit[LlmState]):
    name = UNIT.name
    names = UNIT.names
    defaults: dict[str, Any] = {
        "prompt": "",
        "max_token_len": 127,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "repetition_penalty": 1.1,
        "penalty_window": 64,
        "seed": -1,
        "stop": [],
        "enable_temperature": True,
        "enable_top_p_sampling": True,
        "enable_top_k_sampling": True,
        "enable_repetition_penalty": True,
        "keep_context": False,
        "context_overflow": "error",
        "enkws": False,
        # onnxruntime's threads spin between ops: off, the cores go to audio, vad and kws in between
        # (bench_contention.py); a task with another value loads its own session.
        "spin": True,
    }
    default_input = "llm.utf-8"
    default_response_format = "llm.utf-8.stream"
    link_kinds = frozenset({"asr", "whisper", "kws"})
    input_sources = frozenset({"llm"})

    # setup -------------------------------------------------------------------------------------
    def load(self, task: Task[LlmState]) -> LlmState:
        params = task.params
        if params["context_overflow"] not in ("error", "reset"):
            raise UnitError(ErrorCode.JSON_FORMAT, "context_overflow must be \"error\" or \"reset\"")
        if params["max_token_len"] < 1:
            raise UnitError(ErrorCode.JSON_FORMAT, "max_token_len must be at least 1")
        self._sampling(params, {})  # a setup's sampling values fail here, not at every inference
        progress = task.progress
        if progress:
            progress(0)
        key = ("llm", task.manifest.mode, str(params.get("gguf") or params.get("model_dir")), params["spin"])
        try:
            # A first setup may convert the GGUF: its progress is reported as the "converting" stage.
            report = (lambda percent: progress(percent, "converting")) if progress else None
            engine: LlmEngine = self.shared_model(key, lambda: load_llm(params, report))
        except (OSError, ValueError, KeyError) as exc:
            raise UnitError(ErrorCode.MODEL_LOADING, str(exc)) from None
        if progress:
            progress(100)
        return LlmState(engine)

    def describe(self, task: Task[LlmState]) -> dict[str, Any]:
        return {**task.info(), "context_messages": len(task.state.history)}

    # inputs ------------------------------------------------------------------------------------
    def on_inference(self, job: Job[LlmState]) -> None:
        kind = job.type
        if kind.namespace == "llm" and kind.has("chat_completion"):
            request = job.payload
            if isinstance(request, str):  # the streamed form carries the JSON as text
                try:
                    request = json.loads(request)
                except ValueError:
                    raise UnitError(ErrorCode.JSON_FORMAT, "llm.chat_completion: data is not JSON") from None
            if not isinstance(request, dict):
                raise UnitError(ErrorCode.JSON_FORMAT, "llm.chat_completion: data must be an object")
            self._chat_completion(job, request)
        elif kind.namespace == "llm" and kind.has("score"):
            self._score(job)
        elif kind.namespace == "llm" and kind.has("embed"):
            self._embed(job)
        elif kind.has("base64") or kind.has("wav") or kind.has("pcm") or kind.has("jpeg"):
            raise UnitError(ErrorCode.UNSUPPORTED_OBJECT, f"{job.object}: the llm takes text")
        else:
            if not isinstance(job.payload, str):
                raise UnitError(ErrorCode.JSON_FORMAT, "data: expected string")
            self._user_text(job, job.payload)

    def chain_arrived(self, task: Task[LlmState], source: str, response: dict | None, binary: bytes | None) -> bool:
        if task.upstream.get(source) != "kws":
            return False
        # Barge-in (spec §12.3): stop the running generation, drop prompts queued from asr; client
        # inferences stay queued.
        task.drop_chain_jobs()
        task.cancel_current()
        return True

    def on_chain(self, job: Job[LlmState]) -> None:
        data = (job.payload or {}).get("data") if isinstance(job.payload, dict) else None
        if isinstance(data, dict):
            if not data.get("finish"):
                return  # a linked llm uses only the final transcript of each utterance
            data = data.get("delta")
        if isinstance(data, str) and data.strip():
            self._user_text(job, data)

    # generation --------------------------------------------------------------------------------
    def _user_text(self, job: Job[LlmState], text: str) -> None:
        task = job.task
        if task.params["keep_context"] and text.strip().lower() == RESET_WORD:
            task.state.history = []
            self._deliver_whole(job, RESET_ANSWER)
            return
        messages = [*task.state.history, {"role": "user", "content": text}]
        self._generate(job, messages, None, {}, extension=False)

    def _chat_completion(self, job: Job[LlmState], request: dict[str, Any]) -> None:
        task = job.task
        for key in UNSUPPORTED_KEYS:
            if request.get(key):
                raise UnitError(ErrorCode.UNSUPPORTED_OBJECT, f"{key} not supported by {task.manifest.mode}")
        context = request.get("context") or []
        if not isinstance(context, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in context):
            raise UnitError(ErrorCode.JSON_FORMAT, "context: expected a list of token ids")
        if "messages" in request:
            messages = request["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
                raise UnitError(ErrorCode.JSON_FORMAT, "messages: expected a list of {role, content}")
            raw_prompt = None
        elif isinstance(request.get("prompt"), str):
            messages = [{"role": "user", "content": request["prompt"]}]
            raw_prompt = request["prompt"] if request.get("raw") else None
        else:
            raise UnitError(ErrorCode.JSON_FORMAT, "llm.chat_completion needs messages or prompt")
        self._generate(job, messages, raw_prompt, request, extension=True, context=context,
                       tools=self._tools(task, request))

    @staticmethod
    def _tools(task: Task[LlmState], request: dict[str, Any]):
        """The request's tool offer (None: no tools, or tool_choice "none")."""
        if not request.get("tools"):
            return None
        if "tools" not in task.manifest.data.get("capabilities", []):
            raise UnitError(ErrorCode.UNSUPPORTED_OBJECT, f"tools not supported by {task.manifest.mode}")
        if any(request.get(key) for key in GRAMMAR_KEYS):
            raise UnitError(ErrorCode.JSON_FORMAT, "tools cannot be used together with format or grammar")
        try:
            return tool_request(request["tools"], request.get("tool_choice"), request.get("parallel_tool_calls"))
        except ValueError as exc:
            raise UnitError(ErrorCode.JSON_FORMAT, str(exc)) from None

    @staticmethod
    def _constraint(task: Task[LlmState], engine: LlmEngine, request: dict[str, Any], tools: ToolRequest | None = None):
        """The grammar constraint a request asks for (None: unconstrained)."""
        if tools is not None:
            from llguidance import LLMatcher
            from units.llm.grammar import GrammarConstraint, llg_tokenizer

            try:
                return GrammarConstraint(llg_tokenizer(engine), LLMatcher.grammar_from_lark(tools.grammar()))
            except ValueError as exc:  # a tool's parameters that llguidance cannot take as a JSON Schema
                raise UnitError(ErrorCode.JSON_FORMAT, f"tools: {exc}") from None
        asked = [key for key in GRAMMAR_KEYS if request.get(key)]
        if not asked:
            return None
        if "grammar" not in task.manifest.data.get("capabilities", []):
            raise UnitError(ErrorCode.UNSUPPORTED_OBJECT, f"{asked[0]} not supported by {task.manifest.mode}")
        from units.llm.grammar import build_constraint

        try:
            return build_constraint(engine, request.get("format"), request.get("grammar"))
        except ImportError:  # llguidance missing from this installation
            raise UnitError(ErrorCode.UNSUPPORTED_OBJECT, f"{asked[0]} needs the llguidance package") from None
        except ValueError as exc:
            raise UnitError(ErrorCode.JSON_FORMAT, str(exc)) from None

    def _generate(self, job: Job[LlmState], messages: list[dict], raw_prompt: str | None, request: dict[str, Any],
                  extension: bool, context: list[int] | None = None, tools: ToolRequest | None = None) -> None:
        task = job.task
        engine = task.state.engine
        params = task.params
        max_new = request.get("max_tokens") or params["max_token_len"]
        if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
            raise UnitError(ErrorCode.JSON_FORMAT, "max_tokens: expected a positive integer")
        stop = request.get("stop", params["stop"])
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise UnitError(ErrorCode.JSON_FORMAT, "stop: expected a list of strings")
        finish_note = None
        try:
            prompt_text = raw_prompt if raw_prompt is not None else \
                engine.chat_prompt(messages, params["prompt"] or None, tools=tools.tools if tools else ())
        except (TypeError, ValueError) as exc:
            raise UnitError(ErrorCode.JSON_FORMAT, str(exc)) from None
        ids = list(context or []) + engine.encode(prompt_text)
        window = engine.context_length
        num_ctx = request.get("num_ctx")
        if num_ctx is not None:
            if not isinstance(num_ctx, int) or isinstance(num_ctx, bool) or num_ctx < 1:
                raise UnitError(ErrorCode.JSON_FORMAT, "num_ctx: expected a positive integer")
            # Ollama's per-request window: the answer is cut at its end, a prompt that does not fit is refused.
            window = min(num_ctx, window)
            if len(ids) < window:
                max_new = min(max_new, window - len(ids))
        if len(ids) + max_new > window:
            if params["keep_context"] and params["context_overflow"] == "reset" and task.state.history:
                task.state.history = []
                finish_note = "context_reset"
                ids = engine.encode(engine.chat_prompt(messages[-1:], params["prompt"] or None,
                                                       tools=tools.tools if tools else ()))
            if len(ids) + max_new > window:
                raise UnitError(ErrorCode.CONTEXT_EXCEEDED, f"prompt {len(ids)} tokens + max_token_len {max_new} "
                                                            f"> context {window}")
        sampler = Sampler(self._sampling(params, request, tools is not None))
        constraint = self._constraint(task, engine, request, tools)
        try:
            generation = engine.generate(ids, sampler, max_new, stop=stop, cancel=job.cancel, constraint=constraint)
        except ContextOverflow as exc:
            raise UnitError(ErrorCode.CONTEXT_EXCEEDED, str(exc)) from None
        except ValueError as exc:
            raise UnitError(ErrorCode.JSON_FORMAT, str(exc)) from None
        streaming = task.stream_output
        calling = False  # the answer is tool calls: they are sent whole, parsed, at the end
        with generation:
            for delta in generation:
                calling = calling or (tools is not None and is_call(generation.text))
                if streaming and not calling:
                    job.stream(delta)
        text = generation.text
        extras: dict[str, Any] = {}
        if calling and generation.finish_reason != "cancelled":
            calls = parse_calls(text)  # complete calls only: one cut off by max_tokens is dropped
            if not calls:
                raise UnitError(ErrorCode.JSON_FORMAT, f"the tool call was not complete after max_tokens "
                                                       f"({max_new}) tokens: raise max_tokens or simplify the schema")
            extras["tool_calls"] = calls
            if generation.finish_reason != "length":
                finish_note = finish_note or "tool_calls"
        if extension:
            usage = generation.usage
            extras = {**extras, "finish_reason": finish_note or generation.finish_reason,
                      "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                                "prompt_ms": round(usage.prompt_ms), "decode_ms": round(usage.decode_ms),
                                "load_ms": 0}}
            if request.get("return_tokens"):
                extras["tokens"] = ids + generation.tokens
        if not extension and params["keep_context"] and generation.finish_reason != "cancelled":
            # Before the final message: a client that asks right after it must see the new turn.
            task.state.history = [*messages, {"role": "assistant", "content": text}]
        if streaming:
            job.stream("", True, **extras)
        elif extension:
            job.emit({"text": "" if calling else text, **extras})
        else:
            job.emit(text)

    @staticmethod
    def _sampling(params: dict[str, Any], request: dict[str, Any], tools: bool = False):
        values: dict[str, Any] = {
            "temperature": params["temperature"] if params["enable_temperature"] else 1.0,
            "top_p": params["top_p"] if params["enable_top_p_sampling"] else 1.0,
            "top_k": params["top_k"] if params["enable_top_k_sampling"] else 0,
            "repetition_penalty": params["repetition_penalty"] if params["enable_repetition_penalty"] else 1.0,
            "penalty_window": params["penalty_window"],
            "seed": params["seed"],
        }
        if tools:
            # The call syntax repeats the prompt's tool block by design: the setup's penalty would steer the
            # model away from calling and bend the arguments. A request's own penalty still applies.
            values["repetition_penalty"] = 1.0
        values.update({k: request[k] for k in SAMPLING_KEYS if request.get(k) is not None})
        if isinstance(values.get("logit_bias"), dict):
            try:
                values["logit_bias"] = {int(k): float(v) for k, v in values["logit_bias"].items()}
            except (TypeError, ValueError):
                raise UnitError(ErrorCode.JSON_FORMAT, "logit_bias: token id -> number") from None
        if isinstance(values["seed"], int) and values["seed"] < 0:
            values["seed"] = None  # StackFlow's -1: a fresh seed per request
        try:
            return params_from_request(values)
        except (TypeError, ValueError) as exc:
            raise UnitError(ErrorCode.JSON_FORMAT, str(exc)) from None

    def _deliver_whole(self, job: Job[LlmState], text: str) -> None:
        if job.task.stream_output:
            job.stream(text)
            job.stream("", True)
        else:
            job.emit(text)

    # scoring and embeddings --------------------------------------------------------------------
    def _score(self, job: Job[LlmState]) -> None:
        request = job.payload
        if not isinstance(request, dict) or not isinstance(request.get("input", ""), str) \
                or not isinstance(request.get("choices"), list) or not request["choices"] \
                or not all(isinstance(c, str) for c in request["choices"]):
            raise UnitError(ErrorCode.JSON_FORMAT, "llm.score: {\"input\": text, \"choices\": [text, ...]}")
        engine = job.task.state.engine
        results = []
        for index, choice in enumerate(request["choices"]):
            if job.cancelled:
                return
            try:
                results.append({"index": index, "perplexity": engine.perplexity(request.get("input", ""), choice)})
            except ValueError as exc:
                raise UnitError(ErrorCode.JSON_FORMAT, str(exc)) from None
        job.emit(results, object="llm.score")

    def _embed(self, job: Job[LlmState]) -> None:
        request = job.payload
        texts = request.get("input") if isinstance(request, dict) else None
        if isinstance(texts, str):
            texts = [texts]
        layer = request.get("layer", -1) if isinstance(request, dict) else -1
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts) \
                or not isinstance(layer, int) or isinstance(layer, bool):
            raise UnitError(ErrorCode.JSON_FORMAT, "llm.embed: {\"input\": text or [text, ...], \"layer\": int}")
        engine = job.task.state.engine
        vectors = []
        for text in texts:
            if job.cancelled:
                return
            try:
                vectors.append([round(float(v), 6) for v in engine.embed(text, layer)])
            except ValueError as exc:
                raise UnitError(ErrorCode.JSON_FORMAT, str(exc)) from None
        job.emit(vectors, object="llm.embed")
