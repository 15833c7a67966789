"""OpenAI + DecentralGPT listener (http-apis.md §2), port 8000; Ollama also serves these routes."""
from __future__ import annotations

import base64
import io
import json
import logging
import struct
import time
import uuid
import wave
from typing import Annotated, Any, AsyncIterator, Literal, Optional

from fastapi import APIRouter, File, Form, UploadFile
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from core.sampling import INT32_MAX
from firmware_bridge.http.common import (call_unit, error_responses, finish_reason, gateway, number,
                                         open_llm, require_capability, stop_list, usage_totals, watch)
from firmware_bridge.http.errors import GatewayError
from firmware_bridge.http.gateway import Gateway
from firmware_bridge.http.schemas import (Body, MaxTokens, MinP, OpenAIError, RepetitionPenalty, Seed, Stop, Texts,
                                          TopK, TopP, bounded)
from firmware_bridge.http.streaming import UnitStream, collect, openai_sse, sse, sse_response

log = logging.getLogger(__name__)

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
UNSUPPORTED_ALWAYS = ("logprobs", "top_logprobs")
FINGERPRINT = "unitbus"


def render(settings) -> Any:
    def renderer(exc: GatewayError, path: str = "") -> Response:
        # dbc_strict_status: DecentralGPT answers every failure with 500; the retry headers stay.
        status = 500 if settings["http.openai.dbc_strict_status"] else exc.status
        return JSONResponse(exc.openai_body(settings["http.openai.dbc_fields"]), status_code=status,
                            headers=exc.headers())
    return renderer


# request mapping ----------------------------------------------------------------------------------
def message_text(content: Any, manifest: dict, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in ("image_url", "input_image"):
                require_capability(manifest, "vision", f"messages[{index}].content", "image input")
            elif kind == "input_audio":
                require_capability(manifest, "audio", f"messages[{index}].content", "audio input")
            else:
                raise GatewayError(400, f"messages[{index}].content: unknown part {kind!r}",
                                   param=f"messages[{index}].content")
        return "".join(texts)
    raise GatewayError(400, f"messages[{index}].content: expected a string or a list of parts",
                       param=f"messages[{index}].content")


def sampling(body: dict, manifest: dict, default_max: int) -> dict[str, Any]:
    """Fields shared by chat and completions, as llm.chat_completion keys."""
    for key in UNSUPPORTED_ALWAYS:
        if body.get(key) not in (None, False):
            raise GatewayError(400, f"{key} is not supported", code="unsupported_parameter", param=key)
    n = number(body, "n", 1, integer=True)
    if n not in (None, 1):
        raise GatewayError(400, "n: only 1 is supported", code="unsupported_parameter", param="n")
    data: dict[str, Any] = {}
    max_tokens = number(body, "max_completion_tokens", 1, integer=True)
    if max_tokens is None:
        max_tokens = number(body, "max_tokens", 1, integer=True)
    data["max_tokens"] = max_tokens if max_tokens is not None else default_max
    for key, low, high, integer in (("temperature", 0, 2, False), ("top_p", 0, 1, False), ("seed", None, None, True),
                                    ("presence_penalty", -2, 2, False), ("frequency_penalty", -2, 2, False),
                                    ("top_k", 0, None, True), ("min_p", 0, 1, False),
                                    ("repetition_penalty", 0, None, False)):
        value = number(body, key, low, high, integer)
        if value is not None:
            data[key] = value
    stop = stop_list(body.get("stop"))
    if stop:
        data["stop"] = stop
    bias = body.get("logit_bias")
    if bias:
        if not isinstance(bias, dict):
            raise GatewayError(400, "logit_bias: expected an object", param="logit_bias")
        require_capability(manifest, "logit_bias", "logit_bias")
        try:
            data["logit_bias"] = {str(int(k)): float(v) for k, v in bias.items() if -100 <= float(v) <= 100}
        except (TypeError, ValueError):
            raise GatewayError(400, "logit_bias: keys are token ids, values -100..100", param="logit_bias") from None
        if len(data["logit_bias"]) != len(bias):
            raise GatewayError(400, "logit_bias: values must be within -100..100", param="logit_bias")
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            require_capability(manifest, "grammar", "response_format")
            data["format"] = "json"
        elif kind == "json_schema":
            require_capability(manifest, "grammar", "response_format")
            schema = (fmt.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise GatewayError(400, "response_format.json_schema.schema: expected an object",
                                   param="response_format")
            data["format"] = schema
        elif kind != "text":
            raise GatewayError(400, f"response_format: unknown type {kind!r}", param="response_format")
    return data


def chat_data(body: dict, manifest: dict) -> dict[str, Any]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise GatewayError(400, "messages: expected a non-empty list", param="messages")
    out = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise GatewayError(400, f"messages[{i}].role: expected one of {', '.join(ROLES)}",
                               param=f"messages[{i}].role")
        turn = {"role": ROLES[role], "content": message_text(message.get("content"), manifest, i)}
        if role == "assistant" and message.get("tool_calls"):
            turn["tool_calls"] = [history_call(call, f"messages[{i}].tool_calls[{j}]")
                                  for j, call in enumerate(message["tool_calls"])]
        out.append(turn)
    data: dict[str, Any] = {"messages": out}
    tools = body.get("tools") or [{"type": "function", "function": f} for f in body.get("functions") or []]
    if tools:
        require_capability(manifest, "tools", "tools" if body.get("tools") else "functions", "tool calling")
        data["tools"] = tools
        for key in ("tool_choice", "parallel_tool_calls"):
            if body.get(key) is not None:
                data[key] = body[key]
    elif body.get("tool_choice") not in (None, "none", "auto"):
        raise GatewayError(400, "tool_choice needs tools", param="tool_choice")
    default_max = int(manifest.get("mode_param", {}).get("max_token_len", 1024))
    return {**data, **sampling(body, manifest, default_max)}


def history_call(call: Any, param: str) -> dict[str, Any]:
    """An earlier assistant call ({id, type, function: {name, arguments: JSON text}}) as the unit takes it."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise GatewayError(400, f"{param}: expected {{type: function, function: {{name, arguments}}}}", param=param)
    arguments = function.get("arguments") or "{}"
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        raise GatewayError(400, f"{param}.function.arguments: not JSON", param=f"{param}.function.arguments") from None
    return {"name": function["name"], "arguments": arguments}


def openai_calls(chunk: dict, streamed: bool = False) -> list[dict[str, Any]]:
    """The unit's calls ({name, arguments}) in OpenAI's form, arguments as JSON text (with `index` in a stream)."""
    calls = []
    for i, call in enumerate(chunk.get("tool_calls") or []):
        entry = {"id": new_id("call"), "type": "function",
                 "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
        calls.append({"index": i, **entry} if streamed else entry)
    return calls


def completion_data(body: dict, manifest: dict) -> dict[str, Any]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise GatewayError(400, "prompt: expected a string (token arrays and several prompts are not supported)",
                           code="unsupported_parameter", param="prompt")
    for key, allowed in (("suffix", (None, "")), ("echo", (None, False)), ("best_of", (None, 1))):
        if body.get(key) not in allowed:
            raise GatewayError(400, f"{key} is not supported", code="unsupported_parameter", param=key)
    return {"prompt": prompt, "raw": True, **sampling(body, manifest, 16)}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# streaming bodies ---------------------------------------------------------------------------------
def chat_events(unit_stream: UnitStream, head: Any, rid: str, created: int, model: str, keepalive_s: float,
                include_usage: bool, completion: bool) -> AsyncIterator[bytes]:
    obj = "text_completion" if completion else "chat.completion.chunk"

    def event(choices: list, **extra) -> bytes:
        return sse({"id": rid, "object": obj, "created": created, "model": model,
                    "system_fingerprint": FINGERPRINT, "choices": choices, **extra})

    def choice(delta: Any, reason: str | None) -> dict:
        if completion:
            return {"index": 0, "text": delta, "logprobs": None, "finish_reason": reason}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}

    started = False

    def render(chunk: dict) -> list[bytes]:
        nonlocal started
        out = []
        if not started and not completion:
            out.append(event([choice({"role": "assistant", "content": ""}, None)]))
        started = True
        if chunk.get("delta"):
            out.append(event([choice(chunk["delta"] if completion else {"content": chunk["delta"]}, None)]))
        if chunk.get("tool_calls") and not completion:  # complete calls: each one whole in its first delta
            out.append(event([choice({"tool_calls": openai_calls(chunk, True)}, None)]))
        if chunk.get("finish"):
            out.append(event([choice("" if completion else {}, finish_reason(chunk))]))
            if include_usage:
                out.append(event([], usage=usage_totals(chunk.get("usage"))))
        return out

    return openai_sse(unit_stream, head, keepalive_s, render)


# request bodies -----------------------------------------------------------------------------------
class Part(Body):
    type: str = Field(description="text, image_url, input_image or input_audio (the last three need a model "
                                  "with vision or audio)")
    text: Optional[str] = None


class FunctionCall(Body):
    name: str
    arguments: Optional[str] = Field(None, description="the arguments as JSON text")


class ToolCall(Body):
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: FunctionCall


class Message(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[str | list[Part]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = Field(None, description="an assistant's earlier calls")
    tool_call_id: Optional[str] = Field(None, description="the call a tool message answers")


class StreamOptions(Body):
    include_usage: Optional[bool] = None


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[dict[str, Any]] = None


class Sampling(Body):
    model: str
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    max_tokens: MaxTokens = None
    temperature: bounded("temperature", 0, 2) = None  # type: ignore[valid-type]
    top_p: TopP = None
    top_k: TopK = None
    min_p: MinP = None
    seed: Seed = None
    presence_penalty: bounded("presence_penalty", -2, 2) = None  # type: ignore[valid-type]
    frequency_penalty: bounded("frequency_penalty", -2, 2) = None  # type: ignore[valid-type]
    repetition_penalty: RepetitionPenalty = None
    n: Optional[int] = Field(None, ge=1, le=128, strict=True, description="only 1 is supported")
    stop: Stop = None
    logit_bias: Optional[dict[str, Annotated[float, Field(ge=-100, le=100, strict=True, allow_inf_nan=False)]]] = \
        Field(None, description="token id -> bias; needs a model with the logit_bias capability")
    response_format: Optional[ResponseFormat] = None
    logprobs: Optional[bool] = Field(None, description="not supported (true is a 400)")
    top_logprobs: Optional[int] = Field(None, ge=0, le=20, strict=True, description="not supported")
    user: Optional[str] = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: MaxTokens = None
    tools: Optional[list[dict[str, Any]]] = None
    functions: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Literal["none", "auto", "required"] | dict[str, Any]] = Field(
        None, description='"auto" (text or calls), "none", "required" (calls only) or {"type": "function", '
                          '"function": {"name": ...}} (that call only)')
    parallel_tool_calls: Optional[bool] = Field(None, description="several calls in one answer (default true)")


class CompletionRequest(Sampling):
    prompt: Texts = Field(description="one string (a list of one string is accepted)")
    suffix: Optional[str] = None
    echo: Optional[bool] = None
    best_of: Optional[int] = Field(None, ge=1, le=20, strict=True)


class EmbeddingRequest(Body):
    model: str
    input: Texts
    encoding_format: Optional[Literal["float", "base64"]] = None
    dimensions: Optional[int] = Field(None, ge=1, le=INT32_MAX, strict=True)
    user: Optional[str] = None


class CancelRequest(Body):
    id: str


class SpeechRequest(Body):
    input: str = Field(min_length=1, max_length=4096)
    model: Optional[str] = None
    voice: Optional[str] = None
    response_format: Optional[Literal["wav", "pcm"]] = None
    speed: Optional[float] = Field(None, ge=0.25, le=4.0, strict=True, allow_inf_nan=False)
    stream_format: Optional[Literal["audio"]] = None
    instructions: Optional[str] = None


class ImageRequest(Body):
    prompt: Optional[str] = None
    model: Optional[str] = None


# responses ----------------------------------------------------------------------------------------
class ModelEntry(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    model: str
    url: str


class ModelList(BaseModel):
    object: Literal["list"]
    project: str
    data: list[ModelEntry]


# routes -------------------------------------------------------------------------------------------
def dbc(settings, body: dict) -> dict:
    if settings["http.openai.dbc_fields"]:
        body.update({"code": 0, "message": "success"})
    return body


async def completions(request: Request, body: Sampling, completion: bool) -> Response:
    gw = gateway(request)
    settings = gw.settings
    fields = body.fields()
    model = body.model
    manifest = await gw.find(model)
    data = completion_data(fields, manifest) if completion else chat_data(fields, manifest)
    stream = body.stream is True
    options = fields.get("stream_options") or {}
    rid = new_id("cmpl" if completion else "chatcmpl")
    created = int(time.time())
    notes: dict[str, int] = {}
    _, unit_stream, head = await open_llm(gw, request, manifest, data, rid, keepalive=stream, notes=notes)
    headers = {"X-Unitbus-Truncated-Messages": str(notes["truncated"])} if notes else {}
    if stream:
        return sse_response(chat_events(unit_stream, head, rid, created, model,
                                        float(settings["http.sse_keepalive_s"]), bool(options.get("include_usage")),
                                        completion), headers)
    text, last = await collect(unit_stream, head, request)
    if completion:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason(last)}
    else:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if last.get("tool_calls"):
            message = {"role": "assistant", "content": None, "tool_calls": openai_calls(last)}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(last)}
    return JSONResponse(dbc(settings, {"id": rid, "object": "text_completion" if completion else "chat.completion",
                                       "created": created, "model": model, "system_fingerprint": FINGERPRINT,
                                       "choices": [choice], "usage": usage_totals(last.get("usage"))}),
                        headers=headers)


async def chat(request: Request, body: ChatRequest) -> Response:
    return await completions(request, body, False)


async def complete(request: Request, body: CompletionRequest) -> Response:
    return await completions(request, body, True)


def model_entry(gw: Gateway, manifest: dict, request: Request) -> dict:
    meta = gw.meta(manifest)
    base = gw.settings["http.public_url"] or f"{request.url.scheme}://{request.url.netloc}"
    path = {"asr": "/v1/audio/transcriptions", "tts": "/v1/audio/speech",
            "image": "/v1/images/generations"}.get(manifest["type"], "/v1/chat/completions")
    return {"id": manifest["mode"], "object": "model", "created": int(meta["mtime"]), "owned_by": "unitbus",
            "model": manifest["mode"], "url": base.rstrip("/") + path}


async def list_models(request: Request) -> Response:
    gw = gateway(request)
    models = await gw.models(MODEL_TYPES)
    return JSONResponse({"object": "list", "project": gw.settings["http.openai.project"],
                         "data": [model_entry(gw, m, request) for m in models]})


async def get_model(model: str, request: Request) -> Response:
    gw = gateway(request)
    return JSONResponse(model_entry(gw, await gw.find(model, MODEL_TYPES), request))


async def embeddings(request: Request, body: EmbeddingRequest) -> Response:
    gw = gateway(request)
    manifest = await gw.find(body.model)
    require_capability(manifest, "embed", "model", "embeddings")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise GatewayError(400, "input: expected a string or a non-empty list of strings", param="input")
    answer = await call_unit(gw, request, manifest, "llm.embed", {"input": texts}, new_id("embd"))
    vectors = answer[0] if answer else []
    if body.encoding_format == "base64":  # little-endian float32, what the openai client asks for by default
        vectors = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors]
    return JSONResponse({"object": "list", "model": body.model,
                         "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                         "usage": {"prompt_tokens": 0, "total_tokens": 0}})


async def cancel(request: Request, body: CancelRequest) -> Response:
    if not await gateway(request).cancel(body.id):
        raise GatewayError(404, f"no running request {body.id!r}", code="not_found")
    return JSONResponse({"id": body.id, "cancelled": True})


async def images(request: Request, body: Optional[ImageRequest] = None) -> Response:
    if not await gateway(request).models(("image",)):
        raise GatewayError(501, "Unsupported function: no image model is installed")
    raise GatewayError(501, "Unsupported function: image units are not supported by this gateway")


async def default_model(gw: Gateway, kind: str, name: Any, defaults: tuple[str, ...]) -> dict:
    if name in defaults or name is None:
        models = await gw.models((kind,))
        if not models:
            raise GatewayError(404, f"no {kind} model is installed", code="model_not_found", param="model")
        return models[0]
    return await gw.find(name, (kind,))


async def transcriptions(request: Request, file: UploadFile = File(description="WAV, or raw 16 kHz S16LE as audio/pcm"),
                         model: Optional[str] = Form(None), response_format: Optional[str] = Form(None),
                         language: Optional[str] = Form(None), prompt: Optional[str] = Form(None),
                         temperature: Optional[float] = Form(None)) -> Response:
    gw = gateway(request)
    audio = await file.read()
    manifest = await default_model(gw, "asr", model, ("whisper-1",))
    fmt = response_format or "json"
    if fmt not in ("json", "text"):
        raise GatewayError(400, f"response_format {fmt!r} is not supported", code="unsupported_parameter",
                           param="response_format")
    if audio[:4] == b"RIFF":
        object = "asr.wav.base64"
    elif (file.content_type or "").startswith("audio/pcm"):
        object = "asr.pcm.base64"
    else:
        raise GatewayError(400, "file: only WAV or raw 16 kHz S16LE (audio/pcm) is supported",
                           code="unsupported_parameter", param="file")
    answer = await call_unit(gw, request, manifest, object, base64.b64encode(audio).decode(), new_id("asr"))
    texts = []
    for item in answer:
        text = item.get("delta") if isinstance(item, dict) else item
        if isinstance(text, str) and text.strip():
            texts.append(text.strip())
    text = " ".join(texts)
    return PlainTextResponse(text) if fmt == "text" else JSONResponse({"text": text})


async def speech(request: Request, body: SpeechRequest) -> Response:
    gw = gateway(request)
    if not body.input.strip():
        raise GatewayError(400, "input: expected a string of 1..4096 characters", param="input")
    voices = {m["mode"]: m for m in await gw.models(("tts",))}
    manifest = voices[body.voice] if body.voice in voices else \
        await default_model(gw, "tts", body.model, ("tts-1", "tts-1-hd", "gpt-4o-mini-tts"))
    # The speed travels with the request (tts.speech), so one task serves every speed without a reload;
    # call_unit watches the client and cancels the synthesis when it leaves.
    request_data = {"input": body.input} if body.speed is None else {"input": body.input, "speed": body.speed}
    served = await watch(request, gw.acquire(manifest))
    answer = await watch(request, gw.call(served, "tts.speech", request_data, new_id("tts")))
    pcm = b"".join(base64.b64decode(item["delta"] if isinstance(item, dict) else item)
                   for item in answer if (item.get("delta") if isinstance(item, dict) else item))
    if body.response_format == "pcm":
        return Response(pcm, media_type="audio/pcm")
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(int(served.setup.get("audio_rate", 16000)))
        wav.writeframes(pcm)
    return Response(out.getvalue(), media_type="audio/wav")


MODEL_TYPES = ("llm", "asr", "tts", "image")
ERRORS = error_responses(OpenAIError)
SSE = {"text/event-stream": {}}

# The OpenAI routes, also served by the Ollama and Cortex listeners (which list models their own way).
router = APIRouter(responses=ERRORS, tags=["openai"])
router.add_api_route("/v1/chat/completions", chat, methods=["POST"],
                     responses={200: {"content": SSE, "description": "a completion, or SSE chunks with stream"}})
router.add_api_route("/v1/completions", complete, methods=["POST"],
                     responses={200: {"content": SSE, "description": "a completion, or SSE chunks with stream"}})
router.add_api_route("/v1/embeddings", embeddings, methods=["POST"])
router.add_api_route("/v1/cancel", cancel, methods=["POST"])
router.add_api_route("/v1/images/generations", images, methods=["POST"], description="unsupported: always 501")
router.add_api_route("/v1/images/edits", images, methods=["POST"], description="unsupported: always 501")
router.add_api_route("/v1/audio/transcriptions", transcriptions, methods=["POST"],
                     responses={200: {"content": {"text/plain": {}}, "description": "{text}, or the text alone"}})
router.add_api_route("/v1/audio/speech", speech, methods=["POST"],
                     responses={200: {"content": {"audio/wav": {}, "audio/pcm": {}}, "description": "the speech"}})

# OpenAI's model list: only the OpenAI listener serves it.
models_router = APIRouter(responses=ERRORS, tags=["openai"])
models_router.add_api_route("/v1/models", list_models, methods=["GET"], response_model=ModelList)
models_router.add_api_route("/v1/models/{model:path}", get_model, methods=["GET"], response_model=ModelEntry)

ROUTERS = [router, models_router]
