"""OpenAI + DecentralGPT listener (http-apis.md §2), port 8000; Ollama also serves these routes."""
from __future__ import annotations

import base64
import io
import struct
import logging
import time
import uuid
import wave
from typing import Any, AsyncIterator

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from firmware_bridge.http.common import (call_unit, capabilities, finish_reason, number, open_llm, read_json,
                                         require_capability, stop_list, usage_totals)
from firmware_bridge.http.errors import GatewayError
from firmware_bridge.http.gateway import Gateway
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
        out.append({"role": ROLES[role], "content": message_text(message.get("content"), manifest, i)})
    for key in ("tools", "functions"):
        if body.get(key):
            require_capability(manifest, "tools", key, "tool calling")
    choice = body.get("tool_choice")
    if choice not in (None, "none", "auto") and "tools" not in capabilities(manifest):
        raise GatewayError(400, "tool_choice is not supported", code="unsupported_parameter", param="tool_choice")
    default_max = int(manifest.get("mode_param", {}).get("max_token_len", 1024))
    return {"messages": out, **sampling(body, manifest, default_max)}


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
        if chunk.get("finish"):
            out.append(event([choice("" if completion else {}, finish_reason(chunk))]))
            if include_usage:
                out.append(event([], usage=usage_totals(chunk.get("usage"))))
        return out

    return openai_sse(unit_stream, head, keepalive_s, render)


# routes -------------------------------------------------------------------------------------------
def routes(app: FastAPI) -> None:
    gw: Gateway = app.state.gateway
    settings = gw.settings

    def dbc(body: dict) -> dict:
        if settings["http.openai.dbc_fields"]:
            body.update({"code": 0, "message": "success"})
        return body

    async def completions(request: Request, completion: bool) -> Response:
        body = await read_json(request)
        model = body.get("model")
        manifest = await gw.find(model)
        data = completion_data(body, manifest) if completion else chat_data(body, manifest)
        stream = body.get("stream") is True
        options = body.get("stream_options") or {}
        rid = new_id("cmpl" if completion else "chatcmpl")
        created = int(time.time())
        notes: dict[str, int] = {}
        _, unit_stream, head = await open_llm(gw, request, manifest, data, rid, keepalive=stream, notes=notes)
        headers = {"X-Unitbus-Truncated-Messages": str(notes["truncated"])} if notes else {}
        if stream:
            return sse_response(chat_events(unit_stream, head, rid, created, model,
                                            float(settings["http.sse_keepalive_s"]),
                                            bool(isinstance(options, dict) and options.get("include_usage")),
                                            completion), headers)
        text, last = await collect(unit_stream, head, request)
        if completion:
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason(last)}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason(last)}
        return JSONResponse(dbc({"id": rid, "object": "text_completion" if completion else "chat.completion",
                                 "created": created, "model": model, "system_fingerprint": FINGERPRINT,
                                 "choices": [choice], "usage": usage_totals(last.get("usage"))}), headers=headers)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await completions(request, False)

    @app.post("/v1/completions")
    async def complete(request: Request) -> Response:
        return await completions(request, True)

    def model_entry(manifest: dict, request: Request) -> dict:
        meta = gw.meta(manifest)
        base = settings["http.public_url"] or f"{request.url.scheme}://{request.url.netloc}"
        path = {"asr": "/v1/audio/transcriptions", "tts": "/v1/audio/speech",
                "image": "/v1/images/generations"}.get(manifest["type"], "/v1/chat/completions")
        return {"id": manifest["mode"], "object": "model", "created": int(meta["mtime"]), "owned_by": "unitbus",
                "model": manifest["mode"], "url": base.rstrip("/") + path}

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        models = await gw.models(("llm", "asr", "tts", "image"))
        return JSONResponse({"object": "list", "project": settings["http.openai.project"],
                             "data": [model_entry(m, request) for m in models]})

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request) -> Response:
        manifest = await gw.find(model, ("llm", "asr", "tts", "image"))
        return JSONResponse(model_entry(manifest, request))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        body = await read_json(request)
        model = body.get("model")
        manifest = await gw.find(model)
        require_capability(manifest, "embed", "model", "embeddings")
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise GatewayError(400, "input: expected a string or a list of strings (token arrays are not supported)",
                               code="unsupported_parameter", param="input")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise GatewayError(400, "encoding_format: float or base64", code="unsupported_parameter",
                               param="encoding_format")
        answer = await call_unit(gw, request, manifest, "llm.embed", {"input": texts}, new_id("embd"))
        vectors = answer[0] if answer else []
        if encoding == "base64":  # little-endian float32, what the openai client asks for by default
            vectors = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors]
        return JSONResponse({"object": "list", "model": model,
                             "data": [{"object": "embedding", "index": i, "embedding": v}
                                      for i, v in enumerate(vectors)],
                             "usage": {"prompt_tokens": 0, "total_tokens": 0}})

    @app.post("/v1/cancel")
    async def cancel(request: Request) -> Response:
        body = await read_json(request)
        rid = body.get("id")
        if not isinstance(rid, str) or not await gw.cancel(rid):
            raise GatewayError(404, f"no running request {rid!r}", code="not_found")
        return JSONResponse({"id": rid, "cancelled": True})

    @app.post("/v1/images/generations")
    @app.post("/v1/images/edits")
    async def images(request: Request) -> Response:
        if not await gw.models(("image",)):
            raise GatewayError(501, "Unsupported function: no image model is installed")
        raise GatewayError(501, "Unsupported function: image units are not supported by this gateway")

    async def default_model(kind: str, name: Any, defaults: tuple[str, ...]) -> dict:
        if name in defaults or name is None:
            models = await gw.models((kind,))
            if not models:
                raise GatewayError(404, f"no {kind} model is installed", code="model_not_found", param="model")
            return models[0]
        return await gw.find(name, (kind,))

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise GatewayError(400, "file is required", param="file")
        audio = await upload.read()
        manifest = await default_model("asr", form.get("model"), ("whisper-1",))
        fmt = form.get("response_format") or "json"
        if fmt not in ("json", "text"):
            raise GatewayError(400, f"response_format {fmt!r} is not supported", code="unsupported_parameter",
                               param="response_format")
        if audio[:4] == b"RIFF":
            object = "asr.wav.base64"
        elif (upload.content_type or "").startswith("audio/pcm"):
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

    @app.post("/v1/audio/speech")
    async def speech(request: Request) -> Response:
        body = await read_json(request)
        text = body.get("input")
        if not isinstance(text, str) or not text.strip() or len(text) > 4096:
            raise GatewayError(400, "input: expected a string of 1..4096 characters", param="input")
        if body.get("stream_format") == "sse":
            raise GatewayError(400, "stream_format sse is not supported", code="unsupported_parameter",
                               param="stream_format")
        fmt = body.get("response_format") or "wav"
        if fmt not in ("wav", "pcm"):
            raise GatewayError(400, f"response_format {fmt!r} is not supported (wav, pcm)",
                               code="unsupported_parameter", param="response_format")
        speed = number(body, "speed", 0.25, 4.0)
        voices = {m["mode"]: m for m in await gw.models(("tts",))}
        voice = body.get("voice")
        manifest = voices[voice] if isinstance(voice, str) and voice in voices else \
            await default_model("tts", body.get("model"), ("tts-1", "tts-1-hd", "gpt-4o-mini-tts"))
        setup = {"spacker_speed": float(speed)} if speed is not None else {}
        served = await gw.acquire(manifest, setup=setup)
        answer = await gw.call(served, "tts.utf-8", text, new_id("tts"))
        pcm = b"".join(base64.b64decode(item["delta"] if isinstance(item, dict) else item)
                       for item in answer if (item.get("delta") if isinstance(item, dict) else item))
        if fmt == "pcm":
            return Response(pcm, media_type="audio/pcm")
        out = io.BytesIO()
        with wave.open(out, "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(int(served.setup.get("audio_rate", 16000)))
            wav.writeframes(pcm)
        return Response(out.getvalue(), media_type="audio/wav")
