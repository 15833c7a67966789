"""Ai00 listener (http-apis.md §4), port 65530: one current model, Ai00's prompt layout, samplers and shapes."""
from __future__ import annotations

import asyncio
import re
import secrets
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from core import runtime
from firmware_bridge.http import auth
from firmware_bridge.http.common import (call_unit, capabilities, number, open_llm, read_json, stop_list,
                                         usage_totals, watch)
from firmware_bridge.http.errors import GatewayError
from firmware_bridge.http.gateway import Gateway
from firmware_bridge.http.streaming import STREAM_HEADERS, UnitStream, collect, openai_sse, sse, sse_response

NIL_UUID = "00000000-0000-0000-0000-000000000000"
NAMES = {"system": "System", "user": "User", "assistant": "Assistant", "observation": "Observation",
         "tool": "Observation"}
TEMPLATE = {"record": "{role}: {content}", "prefix": "{assistant}:", "sep": "\n\n"}
DEFAULT_STOP = ["\n\n"]
SAMPLER_KEYS = {
    "Nucleus": {"top_p": 0.5, "top_k": 128, "temperature": 1.0, "presence_penalty": 0.3, "frequency_penalty": 0.3,
                "penalty_decay": 0.99654026},
    "Typical": {"tau": 0.5, "top_k": 128, "temperature": 1.0, "presence_penalty": 0.3, "frequency_penalty": 0.3,
                "penalty_decay": 0.99654026},
    "Mirostat": {"tau": 3.0, "rate": 0.1},
}


def render(settings) -> Any:
    def renderer(exc: GatewayError, path: str = "") -> Response:
        return JSONResponse({"error": exc.openai_error()}, status_code=exc.status, headers=exc.headers())
    return renderer


def clean(text: str) -> str:
    """Ai00's content normalisation: trimmed, runs of blank lines collapsed to one newline."""
    return re.sub(r"\n\s*\n+", "\n", text.strip())


def build_prompt(messages: Any, names: Any = None, template: Any = None) -> str:
    if not isinstance(messages, list) or not messages:
        raise GatewayError(400, "messages: expected a non-empty list", param="messages")
    shown = dict(NAMES)
    if isinstance(names, dict):
        shown.update({str(k).lower(): str(v) for k, v in names.items()})
    layout = dict(TEMPLATE)
    if isinstance(template, dict):
        layout.update({k: v for k, v in template.items() if k in TEMPLATE and isinstance(v, str)})
    records = []
    for i, message in enumerate(messages):
        role = str(message.get("role", "")).lower() if isinstance(message, dict) else ""
        content = message.get("content") if isinstance(message, dict) else None
        if role not in shown or not isinstance(content, str):
            raise GatewayError(400, f"messages[{i}]: expected {{role, content}} with a known role", param="messages")
        records.append(layout["record"].replace("{role}", shown[role]).replace("{content}", clean(content)))
    prefix = layout["prefix"].replace("{assistant}", shown["assistant"]).replace("{user}", shown["user"])
    return layout["sep"].join(records) + layout["sep"] + prefix


def parse_sampler(value: Any) -> dict[str, Any]:
    """A tagged Ai00 sampler with its defaults filled in; keys case-insensitive, `penalty` as a half-life."""
    if not isinstance(value, dict):
        raise GatewayError(400, "sampler: expected an object", param="sampler")
    kind = value.get("type")
    if kind not in SAMPLER_KEYS:
        raise GatewayError(400, f"sampler.type: expected one of {', '.join(SAMPLER_KEYS)}", param="sampler")
    given = {str(k).lower(): v for k, v in value.items() if k != "type"}
    if "learning_rate" in given and "rate" not in given:
        given["rate"] = given.pop("learning_rate")
    out: dict[str, Any] = {"type": kind}
    for key, default in SAMPLER_KEYS[kind].items():
        got = given.get(key, default)
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            raise GatewayError(400, f"sampler.{key}: expected a number", param="sampler")
        out[key] = got
    if "penalty" in given and "penalty_decay" not in given and "penalty_decay" in out:
        half_life = given["penalty"]
        if not isinstance(half_life, (int, float)) or isinstance(half_life, bool) or half_life <= 0:
            raise GatewayError(400, "sampler.penalty: expected a positive half-life in tokens", param="sampler")
        out["penalty_decay"] = 0.5 ** (1.0 / half_life)
    return out


def common_data(body: dict, manifest: dict) -> dict[str, Any]:
    state = body.get("state")
    if state not in (None, "", NIL_UUID):
        raise GatewayError(404, "state not found", code="not_found")
    data: dict[str, Any] = {"max_tokens": number(body, "max_tokens", 1, integer=True) or 256}
    stop = stop_list(body.get("stop"), limit=None) if "stop" in body else DEFAULT_STOP
    if stop:
        data["stop"] = stop
    sampler = body.get("sampler", body.get("sampler_override"))
    if sampler is not None:
        data["sampler"] = parse_sampler(sampler)
    else:
        for key, default in (("top_p", 0.5), ("top_k", 128), ("temperature", 1.0)):
            value = number(body, key, 0, integer=key == "top_k")
            data[key] = default if value is None else value
    bias = body.get("bias", body.get("logit_bias"))
    if bias:
        if not isinstance(bias, dict):
            raise GatewayError(400, "bias: expected an object of token id -> value", param="bias")
        if "logit_bias" not in capabilities(manifest):
            raise GatewayError(400, f"bias is not supported by {manifest['mode']}", param="bias")
        try:
            data["logit_bias"] = {str(int(k)): float(v) for k, v in bias.items()}
        except (TypeError, ValueError):
            raise GatewayError(400, "bias: keys are token ids, values numbers", param="bias") from None
    grammar = body.get("bnf_schema")
    if grammar:
        if not isinstance(grammar, str):
            raise GatewayError(400, "bnf_schema: expected a KBNF string", param="bnf_schema")
        if "grammar" not in capabilities(manifest):
            raise GatewayError(400, f"bnf_schema: {manifest['mode']} has no constrained decoding",
                               param="bnf_schema")
        data["grammar"] = {"type": "kbnf", "text": grammar}
    return data


def ai00_usage(usage: dict | None, seconds: float) -> dict[str, Any]:
    totals = usage_totals(usage)
    return {"prompt": totals["prompt_tokens"], "completion": totals["completion_tokens"],
            "total": totals["total_tokens"], "duration": {"secs": int(seconds), "nanos": int((seconds % 1) * 1e9)},
            **totals}


def reason_of(chunk: dict) -> str | None:
    reason = chunk.get("finish_reason")
    return "length" if reason == "length" else "stop" if chunk.get("finish") else None


def events(unit_stream: UnitStream, head: Any, rid: str, created: int, model: str, chat: bool,
           keepalive_s: float) -> AsyncIterator[bytes]:
    obj = "chat.completion.chunk" if chat else "text_completion.chunk"

    def event(payload: dict, reason: str | None) -> bytes:
        choice = {"delta": payload, "index": 0, "finish_reason": reason} if chat else \
            {"text": payload.get("content", ""), "index": 0, "finish_reason": reason}
        return sse({"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]})

    announced = started = False

    def render(chunk: dict) -> list[bytes]:
        nonlocal announced, started
        out = []
        if not announced and chat:
            out.append(event({"role": "Assistant"}, None))
        announced = True
        delta = chunk.get("delta") or ""
        if not started and chat:
            delta = delta.lstrip()  # the first content chunk loses its leading whitespace (§4)
        if delta:
            started = True
            out.append(event({"content": delta}, None))
        if chunk.get("finish"):
            out.append(event({}, reason_of(chunk)))
        return out

    return openai_sse(unit_stream, head, keepalive_s, render)


def routes(app: FastAPI) -> None:
    gw: Gateway = app.state.gateway
    settings = gw.settings
    app.state.ai00_secret = settings["http.ai00.secret"] or secrets.token_hex(32)
    app.state.current = settings["http.ai00.model"]
    app.state.reload = {}

    async def current() -> dict:
        if not app.state.current:
            models = await gw.models(("llm",))
            if not models:
                raise GatewayError(404, "no llm model is installed", code="model_not_found")
            app.state.current = models[0]["mode"]
        return await gw.find(app.state.current)

    async def generate(request: Request, chat: bool) -> Response:
        body = await read_json(request)
        manifest = await current()
        data = common_data(body, manifest)
        if chat:
            if settings["http.ai00.prompt"] == "native":
                if not isinstance(body.get("messages"), list) or not body["messages"]:
                    raise GatewayError(400, "messages: expected a non-empty list", param="messages")
                data["messages"] = [{"role": "system" if str(m.get("role")).lower() == "system" else
                                     "assistant" if str(m.get("role")).lower() == "assistant" else "user",
                                     "content": str(m.get("content", ""))} for m in body["messages"]]
                if "stop" not in body:
                    data.pop("stop", None)
            else:
                data.update({"prompt": build_prompt(body.get("messages"), body.get("names"), body.get("template")),
                             "raw": True})
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
                prompt = "".join(prompt)
            if not isinstance(prompt, str):
                raise GatewayError(400, "prompt: expected a string or a list of strings", param="prompt")
            data.update({"prompt": prompt, "raw": True})
        model = manifest["mode"]
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        started = time.monotonic()
        stream = body.get("stream") is True
        _, unit_stream, head = await open_llm(gw, request, manifest, data, rid, keepalive=stream)
        if stream:
            return sse_response(events(unit_stream, head, rid, created, model, chat,
                                       float(settings["http.sse_keepalive_s"])))
        text, last = await collect(unit_stream, head, request)
        usage = ai00_usage(last.get("usage"), time.monotonic() - started)
        if chat:
            choice = {"message": {"role": "Assistant", "content": text.strip()}, "index": 0,
                      "finish_reason": reason_of(last)}
            obj = "chat.completion"
        else:
            choice = {"text": text, "index": 0, "finish_reason": reason_of(last)}
            obj = "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
                             "usage": usage})

    async def chooses(request: Request) -> Response:
        body = await read_json(request)
        manifest = await current()
        text = body.get("input")
        if isinstance(text, list) and all(isinstance(t, str) for t in text):
            text = "".join(text)
        choices = body.get("choices")
        if not isinstance(text, str) or not isinstance(choices, list) or not choices \
                or not all(isinstance(c, str) for c in choices):
            raise GatewayError(400, "expected input (string) and choices (list of strings)", param="choices")
        if body.get("state") not in (None, "", NIL_UUID):
            raise GatewayError(404, "state not found", code="not_found")
        rid = f"choose-{uuid.uuid4().hex[:16]}"
        scored = (await call_unit(gw, request, manifest, "llm.score", {"input": text, "choices": choices}, rid))[0]
        ppl = {item["index"]: float(item["perplexity"]) for item in scored}
        if body.get("calibrate"):
            bare = (await call_unit(gw, request, manifest, "llm.score", {"input": "", "choices": choices},
                                    rid + "-cal"))[0]
            for item in bare:
                ppl[item["index"]] /= float(item["perplexity"]) or 1.0
        order = sorted(ppl, key=lambda i: ppl[i])
        data = [{"object": "choice", "index": i, "rank": rank, "choice": choices[i], "perplexity": ppl[i]}
                for rank, i in enumerate(order)]
        return JSONResponse({"object": "list", "model": manifest["mode"], "data": data})

    async def embeddings(request: Request) -> Response:
        body = await read_json(request)
        manifest = await current()
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise GatewayError(400, "input: expected a string or a list of strings", param="input")
        layer = body.get("layer", body.get("embed_layer", -1))
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise GatewayError(400, "layer: expected an integer", param="layer")
        vectors = (await call_unit(gw, request, manifest, "llm.embed", {"input": texts, "layer": layer},
                                   f"embed-{uuid.uuid4().hex[:16]}"))[0]
        return JSONResponse({"object": "list", "model": manifest["mode"],
                             "data": [{"object": "embedding", "index": i, "embedding": v}
                                      for i, v in enumerate(vectors)],
                             "usage": {"prompt_tokens": 0, "total_tokens": 0}})

    async def embeds(request: Request) -> Response:
        body = await read_json(request)
        name = settings["http.ai00.embed_model"]
        if not name:
            raise GatewayError(400, "no embedding model is configured (http.ai00.embed_model)")
        text = body.get("input")
        if not isinstance(text, str) or not text.strip():
            raise GatewayError(400, "input: expected a non-empty string", param="input")
        size = number(body, "max_tokens", 1, 510, integer=True) or 510
        prefix = body.get("prefix", "query:")
        manifest = await gw.find(name)
        # Chunks by whitespace-separated words: the gateway has no tokenizer (the unit does).
        words = text.split()
        chunks = [" ".join(words[i:i + size]) for i in range(0, len(words), size)]
        vectors = (await call_unit(gw, request, manifest, "llm.embed", {"input": [f"{prefix}{c}" for c in chunks]},
                                   f"embeds-{uuid.uuid4().hex[:16]}"))[0]
        return JSONResponse({"object": "embeds", "model": manifest["mode"],
                             "data": [{"object": "embed", "index": 0,
                                       "chunks": [{"chunk": c, "embed": [v]} for c, v in zip(chunks, vectors)]}]})

    async def oai_models() -> Response:
        manifest = await current()
        return JSONResponse({"data": [{"object": "models", "id": manifest["mode"]}]})

    async def chat(request: Request) -> Response:
        return await generate(request, True)

    async def complete(request: Request) -> Response:
        return await generate(request, False)

    for base in ("/api/oai", "/api/oai/v1"):
        app.add_api_route(f"{base}/chat/completions", chat, methods=["POST"])
        app.add_api_route(f"{base}/completions", complete, methods=["POST"])
        app.add_api_route(f"{base}/chooses", chooses, methods=["POST"])
        app.add_api_route(f"{base}/embeddings", embeddings, methods=["POST"])
        app.add_api_route(f"{base}/states", embeddings, methods=["POST"])
        app.add_api_route(f"{base}/embeds", embeds, methods=["POST"])
        app.add_api_route(f"{base}/models", oai_models, methods=["GET"])

    @app.get("/api/adapters")
    async def adapters() -> Response:
        return JSONResponse([f"{p.replace('ExecutionProvider', '')} (onnxruntime {p})"
                             for p in runtime.available_providers()])

    async def info() -> dict:
        manifest = await current()
        state = gw.state(manifest["mode"])
        return {"reload": app.state.reload, "model": {"id": manifest["mode"], "state": state}, "states": []}

    @app.get("/api/models/info")
    async def models_info() -> Response:
        return JSONResponse(await info())

    @app.get("/api/models/list")
    async def models_list() -> Response:
        return JSONResponse([m["mode"] for m in await gw.models(("llm",))])

    @app.get("/api/models/state")
    async def models_state() -> Response:
        async def ticks():
            while True:
                yield sse(await info())
                await asyncio.sleep(0.5)
        return StreamingResponse(ticks(), media_type="text/event-stream; charset=utf-8", headers=STREAM_HEADERS)

    @app.post("/api/auth/exchange")
    async def exchange(request: Request) -> Response:
        body = await read_json(request)
        for pair in settings["http.ai00.app_keys"]:
            if isinstance(pair, dict) and pair.get("app_id") == body.get("app_id") \
                    and pair.get("app_secret") == body.get("app_secret") and body.get("app_secret"):
                token = auth.issue(str(body["app_id"]), app.state.ai00_secret, settings["http.ai00.expire_sec"])
                return JSONResponse({"token": token, "code": 200, "message": "SUCCESS"})
        return JSONResponse({"token": None, "code": 403, "message": "NO-Match AppId and SecretKey"},
                            status_code=403)

    def admin(request: Request) -> None:
        if not settings["http.allow_model_management"]:
            raise GatewayError(403, "model management is disabled")
        if settings["http.ai00.force_pass"]:
            return
        if not settings["http.ai00.app_keys"]:
            raise GatewayError(403, "no admin credentials configured")
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else request.query_params.get("admin_token")
        if not token:
            raise GatewayError(401, "admin token required (POST /api/auth/exchange)", code="invalid_api_key")
        try:
            auth.decode(token, app.state.ai00_secret)
        except auth.TokenError as exc:
            raise GatewayError(401, f"admin token rejected: {exc}", code="invalid_api_key") from None

    @app.post("/admin/models/load")
    async def load(request: Request) -> Response:
        admin(request)
        body = await read_json(request)
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            raise GatewayError(400, "model_path is required", param="model_path")
        stem = path.rsplit("/", 1)[-1]
        for suffix in (".json", ".gguf", ".st", ".safetensors", ".prefab"):
            stem = stem[: -len(suffix)] if stem.endswith(suffix) else stem
        stem = stem[5:] if stem.startswith("mode_") else stem
        manifest = await gw.find(stem)
        if body.get("lora") or body.get("state"):
            raise GatewayError(400, "lora and state entries are not supported", code="unsupported_parameter")
        previous = app.state.current
        if previous and previous != manifest["mode"]:
            await gw.unload(previous)
        app.state.current = manifest["mode"]
        app.state.reload = body
        try:
            await watch(request, gw.acquire(manifest))
        except GatewayError as exc:
            raise GatewayError(500, f"model load failed: {exc.message}", code="model_error") from None
        return Response(status_code=200)

    @app.get("/admin/models/unload")
    async def unload(request: Request) -> Response:
        admin(request)
        manifest = await current()
        await gw.unload(manifest["mode"])
        return Response(status_code=200)

    @app.post("/admin/models/save")
    @app.post("/admin/models/state/load")
    async def not_rwkv(request: Request) -> Response:
        admin(request)
        raise GatewayError(501, "not supported: unitbus has no RWKV prefab or state files")

    @app.post("/admin/files/{rest:path}")
    async def files(request: Request) -> Response:
        raise GatewayError(501, "file administration is not supported by unitbus")
