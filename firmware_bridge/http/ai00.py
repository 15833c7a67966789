"""Ai00 listener (http-apis.md §4), port 65530: one current model, Ai00's prompt layout, samplers and shapes."""
from __future__ import annotations

import asyncio
import re
import secrets
import time
import uuid
from typing import Annotated, Any, AsyncIterator, Literal, Optional

from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from core import runtime, sampling
from core.sampling import INT32_MAX
from firmware_bridge.http import auth
from firmware_bridge.http.common import (call_unit, capabilities, error_responses, gateway, number, open_llm, same_key,
                                         stop_list, usage_totals, watch)
from firmware_bridge.http.errors import GatewayError
from firmware_bridge.http.schemas import Body, MaxTokens, OpenAIError, Seed, Stop, Temperature, Texts, TopK, TopP
from firmware_bridge.http.streaming import STREAM_HEADERS, UnitStream, collect, openai_sse, sse, sse_response

NIL_UUID = "00000000-0000-0000-0000-000000000000"
NAMES = {"system": "System", "user": "User", "assistant": "Assistant", "observation": "Observation",
         "tool": "Observation"}
TEMPLATE = {"record": "{role}: {content}", "prefix": "{assistant}:", "sep": "\n\n"}
DEFAULT_STOP = ["\n\n"]


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
    if kind not in sampling.AI00_SAMPLERS:
        raise GatewayError(400, f"sampler.type: expected one of {', '.join(sampling.AI00_SAMPLERS)}", param="sampler")
    given = {str(k).lower(): v for k, v in value.items() if k != "type"}
    if "learning_rate" in given and "rate" not in given:
        given["rate"] = given.pop("learning_rate")
    out: dict[str, Any] = {"type": kind}
    for key, default in sampling.AI00_SAMPLERS[kind].items():
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
        for key, default in sampling.AI00_FLAT_DEFAULTS.items():
            value = body.get(key)
            data[key] = default if value is None else value
    if body.get("seed") is not None:
        data["seed"] = body["seed"]
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


# request bodies -----------------------------------------------------------------------------------
class Message(Body):
    role: str = Field(description="system, user, assistant, observation or tool (any case), or a key of names")
    content: str


class Sampler(Body):
    """A tagged Ai00 sampler (§4.4); other keys case-insensitive, checked by parse_sampler."""
    type: Literal["Nucleus", "Typical", "Mirostat"]


class Generation(Body):
    max_tokens: MaxTokens = None
    stop: Stop = None
    stream: Optional[bool] = None
    state: Optional[str] = Field(None, description=f"only the nil state {NIL_UUID} (no RWKV states here)")
    sampler: Optional[Sampler] = None
    sampler_override: Optional[Sampler] = None
    top_p: TopP = None
    top_k: TopK = None
    temperature: Temperature = None
    seed: Seed = None
    bias: Optional[dict[str, Annotated[float, Field(strict=True, allow_inf_nan=False)]]] = None
    logit_bias: Optional[dict[str, Annotated[float, Field(strict=True, allow_inf_nan=False)]]] = None
    bnf_schema: Optional[str] = None


class ChatRequest(Generation):
    messages: list[Message] = Field(min_length=1)
    names: Optional[dict[str, str]] = None
    template: Optional[dict[str, str]] = None


class CompletionRequest(Generation):
    prompt: Texts


class ChoosesRequest(Body):
    input: Texts
    choices: list[str] = Field(min_length=1)
    state: Optional[str] = None
    calibrate: Optional[bool] = None


class EmbeddingRequest(Body):
    input: Texts
    layer: Optional[int] = Field(None, ge=-INT32_MAX, le=INT32_MAX, strict=True)
    embed_layer: Optional[int] = Field(None, ge=-INT32_MAX, le=INT32_MAX, strict=True)


class EmbedsRequest(Body):
    input: str
    max_tokens: Optional[int] = Field(None, ge=1, le=510, strict=True)
    prefix: Optional[str] = None


class ExchangeRequest(Body):
    app_id: str
    app_secret: str


class Exchanged(BaseModel):
    token: Optional[str]
    code: int
    message: str


class LoadRequest(Body):
    model_path: str = Field(min_length=1)
    lora: Optional[list[Any]] = None
    state: Optional[list[Any]] = None


# routes -------------------------------------------------------------------------------------------
def init(app: FastAPI) -> None:
    settings = app.state.settings
    app.state.ai00_secret = settings["http.ai00.secret"] or secrets.token_hex(32)
    app.state.current = settings["http.ai00.model"]
    app.state.reload = {}
    app.state.state_streams = 0


async def current(request: Request) -> dict:
    gw, state = gateway(request), request.app.state
    if not state.current:
        models = await gw.models(("llm",))
        if not models:
            raise GatewayError(404, "no llm model is installed", code="model_not_found")
        state.current = models[0]["mode"]
    return await gw.find(state.current)


async def generate(request: Request, body: Generation, chat: bool) -> Response:
    gw = gateway(request)
    settings = gw.settings
    fields = body.fields()
    manifest = await current(request)
    data = common_data(fields, manifest)
    if isinstance(body, ChatRequest):
        if settings["http.ai00.prompt"] == "native":
            data["messages"] = [{"role": m.role.lower() if m.role.lower() in ("system", "assistant") else "user",
                                 "content": m.content} for m in body.messages]
            if body.stop is None:
                data.pop("stop", None)
        else:
            data.update({"prompt": build_prompt(fields["messages"], body.names, body.template), "raw": True})
    else:
        assert isinstance(body, CompletionRequest)
        prompt = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt)
        data.update({"prompt": prompt, "raw": True})
    model = manifest["mode"]
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    started = time.monotonic()
    stream = body.stream is True
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


async def chat(request: Request, body: ChatRequest) -> Response:
    return await generate(request, body, True)


async def complete(request: Request, body: CompletionRequest) -> Response:
    return await generate(request, body, False)


async def chooses(request: Request, body: ChoosesRequest) -> Response:
    gw = gateway(request)
    manifest = await current(request)
    text = body.input if isinstance(body.input, str) else "".join(body.input)
    choices = body.choices
    if body.state not in (None, "", NIL_UUID):
        raise GatewayError(404, "state not found", code="not_found")
    rid = f"choose-{uuid.uuid4().hex[:16]}"
    scored = (await call_unit(gw, request, manifest, "llm.score", {"input": text, "choices": choices}, rid))[0]
    ppl = {item["index"]: float(item["perplexity"]) for item in scored}
    if body.calibrate:
        bare = (await call_unit(gw, request, manifest, "llm.score", {"input": "", "choices": choices},
                                rid + "-cal"))[0]
        for item in bare:
            ppl[item["index"]] /= float(item["perplexity"]) or 1.0
    order = sorted(ppl, key=lambda i: ppl[i])
    data = [{"object": "choice", "index": i, "rank": rank, "choice": choices[i], "perplexity": ppl[i]}
            for rank, i in enumerate(order)]
    return JSONResponse({"object": "list", "model": manifest["mode"], "data": data})


async def embeddings(request: Request, body: EmbeddingRequest) -> Response:
    gw = gateway(request)
    manifest = await current(request)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise GatewayError(400, "input: expected a string or a non-empty list of strings", param="input")
    layer = body.layer if body.layer is not None else body.embed_layer if body.embed_layer is not None else -1
    vectors = (await call_unit(gw, request, manifest, "llm.embed", {"input": texts, "layer": layer},
                               f"embed-{uuid.uuid4().hex[:16]}"))[0]
    return JSONResponse({"object": "list", "model": manifest["mode"],
                         "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                         "usage": {"prompt_tokens": 0, "total_tokens": 0}})


async def embeds(request: Request, body: EmbedsRequest) -> Response:
    gw = gateway(request)
    name = gw.settings["http.ai00.embed_model"]
    if not name:
        raise GatewayError(400, "no embedding model is configured (http.ai00.embed_model)")
    if not body.input.strip():
        raise GatewayError(400, "input: expected a non-empty string", param="input")
    size = body.max_tokens or 510
    prefix = "query:" if body.prefix is None else body.prefix
    manifest = await gw.find(name)
    # Chunks by whitespace-separated words: the gateway has no tokenizer (the unit does).
    words = body.input.split()
    chunks = [" ".join(words[i:i + size]) for i in range(0, len(words), size)]
    vectors = (await call_unit(gw, request, manifest, "llm.embed", {"input": [f"{prefix}{c}" for c in chunks]},
                               f"embeds-{uuid.uuid4().hex[:16]}"))[0]
    return JSONResponse({"object": "embeds", "model": manifest["mode"],
                         "data": [{"object": "embed", "index": 0,
                                   "chunks": [{"chunk": c, "embed": [v]} for c, v in zip(chunks, vectors)]}]})


async def oai_models(request: Request) -> Response:
    manifest = await current(request)
    return JSONResponse({"data": [{"object": "models", "id": manifest["mode"]}]})


async def adapters() -> Response:
    return JSONResponse([f"{p.replace('ExecutionProvider', '')} (onnxruntime {p})"
                         for p in runtime.available_providers()])


async def info(request: Request) -> dict:
    manifest = await current(request)
    state = gateway(request).state(manifest["mode"])
    return {"reload": request.app.state.reload, "model": {"id": manifest["mode"], "state": state}, "states": []}


async def models_info(request: Request) -> Response:
    return JSONResponse(await info(request))


async def models_list(request: Request) -> Response:
    return JSONResponse([m["mode"] for m in await gateway(request).models(("llm",))])


async def models_state(request: Request) -> Response:
    """The model's state every 0.5 s until the client leaves; at most http.ai00.max_state_streams at once
    (each holds a connection and wakes the loop), beyond that 429."""
    state = request.app.state
    limit = int(state.settings["http.ai00.max_state_streams"])
    if state.state_streams >= limit:
        raise GatewayError(429, f"too many model state streams open ({limit} allowed)", retry_after=5)
    first_tick = await info(request)  # a failure here is an error status, not a broken stream
    state.state_streams += 1

    async def ticks():
        try:
            tick = first_tick
            while True:
                yield sse(tick)
                await asyncio.sleep(0.5)
                tick = await info(request)
        finally:
            state.state_streams -= 1
    return StreamingResponse(ticks(), media_type="text/event-stream; charset=utf-8", headers=STREAM_HEADERS)


async def exchange(request: Request, body: ExchangeRequest) -> Response:
    settings = request.app.state.settings
    for pair in settings["http.ai00.app_keys"]:
        if isinstance(pair, dict) and body.app_secret and same_key(body.app_id, str(pair.get("app_id", ""))) \
                and same_key(body.app_secret, str(pair.get("app_secret", ""))):
            token = auth.issue(body.app_id, request.app.state.ai00_secret, settings["http.ai00.expire_sec"])
            return JSONResponse({"token": token, "code": 200, "message": "SUCCESS"})
    return JSONResponse({"token": None, "code": 403, "message": "NO-Match AppId and SecretKey"}, status_code=403)


def admin(request: Request) -> None:
    settings = request.app.state.settings
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
        auth.decode(token, request.app.state.ai00_secret)
    except auth.TokenError as exc:
        raise GatewayError(401, f"admin token rejected: {exc}", code="invalid_api_key") from None


async def load(request: Request, body: LoadRequest) -> Response:
    admin(request)
    gw, state = gateway(request), request.app.state
    stem = body.model_path.rsplit("/", 1)[-1]
    for suffix in (".json", ".gguf", ".st", ".safetensors", ".prefab"):
        stem = stem[: -len(suffix)] if stem.endswith(suffix) else stem
    stem = stem[5:] if stem.startswith("mode_") else stem
    manifest = await gw.find(stem)
    if body.lora or body.state:
        raise GatewayError(400, "lora and state entries are not supported", code="unsupported_parameter")
    previous = state.current
    if previous and previous != manifest["mode"]:
        await gw.unload(previous)
    state.current = manifest["mode"]
    state.reload = body.fields()
    try:
        await watch(request, gw.acquire(manifest))
    except GatewayError as exc:
        raise GatewayError(500, f"model load failed: {exc.message}", code="model_error") from None
    return Response(status_code=200)


async def unload(request: Request) -> Response:
    admin(request)
    manifest = await current(request)
    await gateway(request).unload(manifest["mode"])
    return Response(status_code=200)


async def not_rwkv(request: Request) -> Response:
    admin(request)
    raise GatewayError(501, "not supported: unitbus has no RWKV prefab or state files")


async def files(request: Request, rest: str) -> Response:
    raise GatewayError(501, "file administration is not supported by unitbus")


SSE = {"text/event-stream": {}}
router = APIRouter(responses=error_responses(OpenAIError), tags=["ai00"])
for _base in ("/api/oai", "/api/oai/v1"):
    router.add_api_route(f"{_base}/chat/completions", chat, methods=["POST"],
                         responses={200: {"content": SSE, "description": "a completion, or SSE chunks with stream"}})
    router.add_api_route(f"{_base}/completions", complete, methods=["POST"],
                         responses={200: {"content": SSE, "description": "a completion, or SSE chunks with stream"}})
    router.add_api_route(f"{_base}/chooses", chooses, methods=["POST"])
    router.add_api_route(f"{_base}/embeddings", embeddings, methods=["POST"])
    router.add_api_route(f"{_base}/states", embeddings, methods=["POST"])
    router.add_api_route(f"{_base}/embeds", embeds, methods=["POST"])
    router.add_api_route(f"{_base}/models", oai_models, methods=["GET"])
router.add_api_route("/api/adapters", adapters, methods=["GET"])
router.add_api_route("/api/models/info", models_info, methods=["GET"])
router.add_api_route("/api/models/list", models_list, methods=["GET"])
router.add_api_route("/api/models/state", models_state, methods=["GET"],
                     responses={200: {"content": SSE, "description": "the model state every 0.5 s, never ending"}})
router.add_api_route("/api/auth/exchange", exchange, methods=["POST"], response_model=Exchanged,
                     responses={403: {"model": Exchanged, "description": "no app_id/app_secret pair matches"}})
router.add_api_route("/admin/models/load", load, methods=["POST"])
router.add_api_route("/admin/models/unload", unload, methods=["GET"])
router.add_api_route("/admin/models/save", not_rwkv, methods=["POST"], description="unsupported: always 501")
router.add_api_route("/admin/models/state/load", not_rwkv, methods=["POST"], description="unsupported: always 501")
router.add_api_route("/admin/files/{rest:path}", files, methods=["POST"], description="unsupported: always 501")

ROUTERS = [router]
