"""Ollama listener (http-apis.md §3), port 11434: /api/* in Ollama's shapes, plus the OpenAI routes under /v1."""
from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from typing import Annotated, Any, Literal, Optional

from fastapi import APIRouter
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from core.errors import ErrorCode
from core.sampling import INT32_MAX
from firmware_bridge.http import openai
from firmware_bridge.http.common import capabilities, error_responses, gateway, number, open_llm, stop_list, watch
from firmware_bridge.http.errors import GatewayError
from firmware_bridge.http.gateway import Gateway, parse_duration
from firmware_bridge.http.schemas import (Body, MinP, Penalty, RepetitionPenalty, Seed, Stop, Temperature, Texts, TopK,
                                          TopP, TypicalP, bounded)
from firmware_bridge.http.streaming import UnitStream, collect, ndjson, ndjson_response, pump

log = logging.getLogger(__name__)

BUSY = "server busy, please try again.  maximum pending requests exceeded"
IGNORED_OPTIONS = {"num_keep", "tfs_z", "penalize_newline", "numa", "num_batch", "num_gpu", "main_gpu", "low_vram",
                   "f16_kv", "vocab_only", "use_mmap", "use_mlock", "num_thread", "draft_num_predict"}
NUMERIC_OPTIONS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                   "typical_p": "typical_p", "seed": "seed", "repeat_penalty": "repetition_penalty",
                   "repeat_last_n": "penalty_window", "presence_penalty": "presence_penalty",
                   "frequency_penalty": "frequency_penalty"}
FOREVER = "9999-12-31T23:59:59Z"


def render(settings) -> Any:
    openai_render = openai.render(settings)

    def renderer(exc: GatewayError, path: str = "") -> Response:
        if path.startswith("/v1/"):
            return openai_render(exc, path)
        message = BUSY if exc.status == 503 and exc.unit_code == ErrorCode.QUEUE_FULL else exc.message
        return JSONResponse({"error": message}, status_code=exc.status, headers=exc.headers())
    return renderer


def rfc3339(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def split_name(name: Any) -> tuple[str, str]:
    """(model, tag); a name without a tag means :latest."""
    if not isinstance(name, str) or not name:
        raise GatewayError(400, "model is required")
    base, sep, tag = name.rpartition(":")
    if not sep or "/" in tag:
        return name, "latest"
    return base, tag


async def find(gw: Gateway, name: Any) -> tuple[dict, str]:
    """The manifest and the name to echo (with its tag); 404 in Ollama's words."""
    base, tag = split_name(name)
    try:
        if tag != "latest":
            raise GatewayError(404, "")
        manifest = await gw.find(base)
    except GatewayError as exc:
        if exc.status == 404:
            raise GatewayError(404, f"model '{name}' not found", code="model_not_found") from None
        raise
    return manifest, f"{base}:{tag}"


def details(manifest: dict) -> dict[str, Any]:
    d = manifest.get("details") or {}
    return {"parent_model": d.get("parent_model", ""), "format": d.get("format", ""), "family": d.get("family", ""),
            "families": d.get("families") or None, "parameter_size": d.get("parameter_size", ""),
            "quantization_level": d.get("quantization_level", "")}


def options(body: dict) -> dict[str, Any]:
    opts = body.get("options") or {}
    if not isinstance(opts, dict):
        raise GatewayError(400, "options: expected an object")
    data: dict[str, Any] = {}
    for key, value in opts.items():
        if value is None:
            continue
        if key in NUMERIC_OPTIONS:
            integer = key in ("top_k", "seed", "repeat_last_n")
            data[NUMERIC_OPTIONS[key]] = number(opts, key, integer=integer)
        elif key == "num_predict":
            n = number(opts, key, integer=True)
            if n is not None and n > 0:
                data["max_tokens"] = n
            elif n is not None and n not in (-1, -2):
                raise GatewayError(400, "num_predict: expected a positive number, -1 or -2")
        elif key == "stop":
            data["stop"] = stop_list(value, "stop", None)
        elif key == "num_ctx":
            data["num_ctx"] = number(opts, key, 1, integer=True)
        elif key == "mirostat":
            mode = number(opts, key, 0, 2, integer=True)
            if mode:
                data["sampler"] = {"type": "Mirostat", "tau": number(opts, "mirostat_tau") or 5.0,
                                   "rate": number(opts, "mirostat_eta") or 0.1}
        elif key in ("mirostat_tau", "mirostat_eta"):
            number(opts, key)
        elif key in IGNORED_OPTIONS:
            log.debug("option %s has no effect", key)
        else:
            log.info("invalid option provided: %s", key)
    return data


def check_common(body: dict, manifest: dict) -> None:
    caps = capabilities(manifest)
    name = manifest["mode"]
    if body.get("think") not in (None, False, True, "low", "medium", "high"):
        raise GatewayError(400, 'think: expected a boolean or "low", "medium", "high"')
    for key in ("logprobs", "top_logprobs"):
        if body.get(key):
            raise GatewayError(400, f"{key} is not supported")
    fmt = body.get("format")
    if fmt not in (None, ""):
        if not (fmt == "json" or isinstance(fmt, dict)):
            raise GatewayError(400, "format: expected \"json\" or a JSON schema object")
        if "grammar" not in caps:
            raise GatewayError(400, f'"{name}" does not support structured output (format)')
    if body.get("tools") and "tools" not in caps:
        raise GatewayError(400, f'"{name}" does not support tools')


def keep_alive_of(body: dict) -> Any:
    if "keep_alive" not in body or body["keep_alive"] is None:
        return "default"
    try:
        return parse_duration(body["keep_alive"])
    except ValueError as exc:
        raise GatewayError(400, str(exc)) from None


def final_stats(last: dict, started: float, load_ns: int) -> dict[str, Any]:
    usage = last.get("usage") or {}
    return {"total_duration": int((time.monotonic() - started) * 1e9), "load_duration": load_ns,
            "prompt_eval_count": int(usage.get("prompt_tokens", 0)),
            "prompt_eval_duration": int(float(usage.get("prompt_ms", 0)) * 1e6),
            "eval_count": int(usage.get("completion_tokens", 0)),
            "eval_duration": int(float(usage.get("decode_ms", 0)) * 1e6)}


# request bodies -----------------------------------------------------------------------------------
class Options(Body):
    """Ollama's `options` (§3.6): the sampling ones mapped onto the unit's keys, the rest logged."""
    temperature: Temperature = None
    top_k: TopK = None
    top_p: TopP = None
    min_p: MinP = None
    typical_p: TypicalP = None
    seed: Seed = None
    repeat_penalty: RepetitionPenalty = None
    repeat_last_n: bounded("penalty_window") = None  # type: ignore[valid-type]
    presence_penalty: Penalty = None
    frequency_penalty: bounded("frequency_penalty") = None  # type: ignore[valid-type]
    num_ctx: Optional[int] = Field(None, ge=1, le=INT32_MAX, strict=True,
                                   description="the context window of this request (at most the model's)")
    num_predict: Optional[int] = Field(None, ge=-2, le=INT32_MAX, strict=True,
                                       description="a positive limit, or -1/-2 for the model's default")
    stop: Stop = None
    mirostat: Optional[int] = Field(None, ge=0, le=2, strict=True)
    mirostat_tau: bounded("mirostat_tau") = None  # type: ignore[valid-type]
    mirostat_eta: bounded("mirostat_eta") = None  # type: ignore[valid-type]


KeepAlive = Optional[str | Annotated[float, Field(allow_inf_nan=False)]]
Format = Optional[Literal["json", ""] | dict[str, Any]]


class Function(Body):
    name: str
    arguments: Optional[dict[str, Any]] = None


class ToolCall(Body):
    function: Function


class Message(Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: Optional[str] = None
    images: Optional[list[str]] = None
    tool_calls: Optional[list[ToolCall]] = Field(None, description="an assistant's earlier calls")
    tool_name: Optional[str] = Field(None, description="the tool a tool message answers")
    thinking: Optional[str] = None


class Common(Body):
    model: str
    stream: Optional[bool] = None
    format: Format = None
    options: Optional[Options] = None
    keep_alive: KeepAlive = None
    think: Optional[bool | str] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20, strict=True)


class GenerateRequest(Common):
    prompt: Optional[str] = None
    suffix: Optional[str] = None
    system: Optional[str] = None
    template: Optional[str] = None
    context: Optional[list[Annotated[int, Field(ge=0, le=INT32_MAX, strict=True)]]] = None
    raw: Optional[bool] = None
    images: Optional[list[str]] = None


class ChatRequest(Common):
    messages: Optional[list[Message]] = None
    tools: Optional[list[dict[str, Any]]] = None


class NamedRequest(Body):
    model: Optional[str] = None
    name: Optional[str] = Field(None, description="older clients' spelling of model")
    stream: Optional[bool] = None
    verbose: Optional[bool] = None


class EmbedRequest(Body):
    model: str
    input: Texts
    dimensions: Optional[int] = Field(None, ge=1, le=INT32_MAX, strict=True)
    truncate: Optional[bool] = None
    keep_alive: KeepAlive = None
    options: Optional[Options] = None


class EmbeddingsRequest(Body):
    model: str
    prompt: str
    keep_alive: KeepAlive = None
    options: Optional[Options] = None


class Error(BaseModel):
    error: str


# routes -------------------------------------------------------------------------------------------
async def root() -> Response:
    return PlainTextResponse("Ollama is running")


async def version(request: Request) -> Response:
    return JSONResponse({"version": gateway(request).settings["http.ollama.reported_version"]})


async def load_or_unload(gw: Gateway, manifest: dict, name: str, keep_alive: Any, chat: bool,
                         request: Request) -> Response:
    now = rfc3339(time.time())
    if keep_alive == 0:
        await gw.unload(manifest["mode"])
        reason = "unload"
    else:
        await watch(request, gw.acquire(manifest, keep_alive=keep_alive))
        reason = "load"
    body: dict[str, Any] = {"model": name, "created_at": now, "response": "", "done": True, "done_reason": reason}
    if chat:
        body.pop("response")
        body["message"] = {"role": "assistant", "content": ""}
    return JSONResponse(body)


async def generate_like(request: Request, fields: dict[str, Any], chat: bool) -> Response:
    gw = gateway(request)
    started = time.monotonic()
    body = fields
    manifest, name = await find(gw, body.get("model"))
    check_common(body, manifest)
    keep_alive = keep_alive_of(body)
    caps = capabilities(manifest)
    data = options(body)
    raw = False
    if chat:
        messages = body.get("messages")
        if not messages:
            return await load_or_unload(gw, manifest, name, keep_alive, True, request)
        out = []
        for m in messages:
            if m.get("images") and "vision" not in caps:
                raise GatewayError(400, "model does not support images")
            turn = {"role": m["role"], "content": m.get("content") or ""}
            if m.get("tool_calls"):
                turn["tool_calls"] = [{"name": c["function"]["name"], "arguments": c["function"].get("arguments") or {}}
                                      for c in m["tool_calls"]]
            out.append(turn)
        data["messages"] = out
        if body.get("tools"):
            data["tools"] = body["tools"]
    else:
        prompt = body.get("prompt") or ""
        if body.get("images") and "vision" not in caps:
            raise GatewayError(400, "model does not support images")
        if body.get("suffix") and "insert" not in caps:
            raise GatewayError(400, "model does not support insert")
        if body.get("template"):
            raise GatewayError(400, "custom templates are not supported")
        if not prompt:
            return await load_or_unload(gw, manifest, name, keep_alive, False, request)
        raw = body.get("raw") is True
        system = body.get("system")
        if raw:
            data.update({"prompt": prompt, "raw": True})
        else:
            data["messages"] = ([{"role": "system", "content": system}] if system else []) \
                + [{"role": "user", "content": prompt}]
            data["return_tokens"] = True
        if body.get("context"):
            data["context"] = body["context"]
    fmt = body.get("format")
    if fmt not in (None, ""):
        data["format"] = fmt
    data.setdefault("max_tokens", int(manifest.get("mode_param", {}).get("max_token_len", 1024)))
    was_loaded = gw.state(manifest["mode"]) == "loaded"
    t_load = time.monotonic()
    await watch(request, gw.acquire(manifest, keep_alive=keep_alive))
    load_ns = 0 if was_loaded else int((time.monotonic() - t_load) * 1e9)
    rid = f"ollama-{uuid.uuid4().hex[:24]}"
    _, unit_stream, head = await open_llm(gw, request, manifest, data, rid, keep_alive=keep_alive)

    thinking = body.get("think") not in (None, False)

    def piece(text: str, done: bool, last: dict | None = None) -> dict:
        obj: dict[str, Any] = {"model": name, "created_at": rfc3339(time.time())}
        if chat:
            obj["message"] = {"role": "assistant", "content": text}
            if thinking:  # the model does not think aloud: Ollama's field, empty
                obj["message"]["thinking"] = ""
            if last is not None and last.get("tool_calls"):
                obj["message"]["tool_calls"] = [{"function": {"index": i, **call}}
                                                for i, call in enumerate(last["tool_calls"])]
        else:
            obj["response"] = text
        obj["done"] = done
        if done and last is not None:
            obj["done_reason"] = "length" if last.get("finish_reason") == "length" else "stop"
            if not chat and not raw and isinstance(last.get("tokens"), list):
                obj["context"] = last["tokens"]
            obj.update(final_stats(last, started, load_ns))
        return obj

    if body.get("stream", True) is not False:
        return ndjson_response(ndjson_events(unit_stream, head, piece))
    text, last = await collect(unit_stream, head, request)
    return JSONResponse(piece(text, True, last))


async def generate(request: Request, body: GenerateRequest) -> Response:
    return await generate_like(request, body.fields(), False)


async def chat(request: Request, body: ChatRequest) -> Response:
    return await generate_like(request, body.fields(), True)


def tag_entry(gw: Gateway, manifest: dict) -> dict:
    meta = gw.meta(manifest)
    name = f"{manifest['mode']}:latest"
    return {"name": name, "model": name, "modified_at": rfc3339(meta["mtime"]), "size": meta["size"],
            "digest": meta["digest"], "details": details(manifest)}


async def tags(request: Request) -> Response:
    gw = gateway(request)
    return JSONResponse({"models": [tag_entry(gw, m) for m in await gw.models(("llm",))]})


async def show(request: Request, body: NamedRequest) -> Response:
    gw = gateway(request)
    manifest, _ = await find(gw, body.model or body.name)
    meta = gw.meta(manifest)
    params = manifest.get("mode_param", {})
    sampling = {k: params[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty") if k in params}
    d = manifest.get("details") or {}
    family = d.get("family", "")
    info: dict[str, Any] = {}
    if family:
        info["general.architecture"] = family
        if "context_length" in params:
            info[f"{family}.context_length"] = params["context_length"]
    if "parameter_count" in d:
        info["general.parameter_count"] = d["parameter_count"]
    caps = capabilities(manifest)
    shown = ["completion"] + [c for c in ("tools", "insert", "vision", "thinking") if c in caps]
    lines = "\n".join(f"{k} {v}" for k, v in sampling.items())
    modelfile = (f"# generated by unitbus from {meta['path'].rsplit('/', 1)[-1]}\nFROM {manifest['mode']}\n"
                 + "".join(f"PARAMETER {k} {v}\n" for k, v in sampling.items()))
    return JSONResponse({"modelfile": modelfile, "parameters": lines, "template": "",
                         "details": details(manifest), "model_info": info, "capabilities": shown,
                         "modified_at": rfc3339(meta["mtime"])})


async def ps(request: Request) -> Response:
    gw = gateway(request)
    manifests = {m["mode"]: m for m in await gw.models(("llm",))}
    by_alias = {a: m for m in manifests.values() for a in m.get("aliases", [])}
    out = []
    for task in await gw.tasks():
        if not str(task.get("work_id", "")).startswith("llm."):
            continue
        manifest = manifests.get(task.get("model")) or by_alias.get(task.get("model"))
        if manifest is None:
            continue
        mine = next((s for s in gw.served.values() if s.work_id == task["work_id"]), None)
        expires = mine.expires_at() if mine is not None else None
        entry = tag_entry(gw, manifest)
        entry.pop("modified_at")
        entry.update({"expires_at": rfc3339(expires) if expires is not None else FOREVER, "size_vram": 0,
                      "context_length": manifest.get("mode_param", {}).get("context_length", 0)})
        out.append(entry)
    return JSONResponse({"models": out})


def management(gw: Gateway) -> None:
    if not gw.settings["http.allow_model_management"]:
        raise GatewayError(403, "model management is disabled")


async def pull(request: Request, body: NamedRequest) -> Response:
    gw = gateway(request)
    management(gw)
    try:
        manifest, _ = await find(gw, body.model or body.name)
    except GatewayError as exc:
        if exc.status != 404:
            raise
        raise GatewayError(501, "no model source is configured (models.sources)") from None
    log.info("pull of installed model %s: nothing to do", manifest["mode"])
    if body.stream is False:
        return JSONResponse({"status": "success"})

    async def done():
        yield ndjson({"status": "success"})
    return ndjson_response(done())


async def delete(request: Request, body: NamedRequest) -> Response:
    gw = gateway(request)
    management(gw)
    manifest, _ = await find(gw, body.model or body.name)
    await gw.unload(manifest["mode"])
    await gw.delete_model(manifest)
    return Response(status_code=200)


async def embed_vectors(request: Request, model: str, texts: list[str], keep_alive: Any) -> tuple[int, list]:
    """(load_duration in ns, one vector per text)."""
    gw = gateway(request)
    manifest, _ = await find(gw, model)
    if "embed" not in capabilities(manifest):
        raise GatewayError(400, f'"{manifest["mode"]}" does not support embeddings')
    was_loaded = gw.state(manifest["mode"]) == "loaded"
    t_load = time.monotonic()
    served = await watch(request, gw.acquire(manifest, keep_alive=keep_alive))
    load_ns = 0 if was_loaded else int((time.monotonic() - t_load) * 1e9)
    answer = await watch(request, gw.call(served, "llm.embed", {"input": texts}, f"embed-{uuid.uuid4().hex[:16]}"))
    return load_ns, answer[0] if answer else []


async def embed(request: Request, body: EmbedRequest) -> Response:
    started = time.monotonic()
    texts = [body.input] if isinstance(body.input, str) else body.input
    load_ns, vectors = await embed_vectors(request, body.model, texts, keep_alive_of(body.fields()))
    if body.dimensions is not None:
        vectors = [v[:body.dimensions] for v in vectors]
    # prompt_eval_count stays 0: the unit's llm.embed answer carries no token counts.
    return JSONResponse({"model": body.model, "embeddings": vectors,
                         "total_duration": int((time.monotonic() - started) * 1e9), "load_duration": load_ns,
                         "prompt_eval_count": 0})


async def embeddings(request: Request, body: EmbeddingsRequest) -> Response:
    _, vectors = await embed_vectors(request, body.model, [body.prompt], keep_alive_of(body.fields()))
    return JSONResponse({"embedding": vectors[0] if vectors else []})


async def unsupported(request: Request) -> Response:
    raise GatewayError(501, f"{request.url.path} is not supported by unitbus")


NDJSON = {"application/x-ndjson": {}}
NO_SOURCE = "an installed model succeeds at once; pulling any other is unsupported (501: no model source)"
router = APIRouter(responses=error_responses(Error), tags=["ollama"])
for _method in ("GET", "HEAD"):  # one route per method: each OpenAPI operation has its own id
    router.add_api_route("/", root, methods=[_method], response_class=PlainTextResponse)
    router.add_api_route("/api/version", version, methods=[_method])
    router.add_api_route("/api/tags", tags, methods=[_method])
router.add_api_route("/api/generate", generate, methods=["POST"],
                     responses={200: {"content": NDJSON, "description": "NDJSON pieces, or one object without stream"}})
router.add_api_route("/api/chat", chat, methods=["POST"],
                     responses={200: {"content": NDJSON, "description": "NDJSON pieces, or one object without stream"}})
router.add_api_route("/api/show", show, methods=["POST"])
router.add_api_route("/api/ps", ps, methods=["GET"])
router.add_api_route("/api/pull", pull, methods=["POST"], description=NO_SOURCE)
router.add_api_route("/api/delete", delete, methods=["DELETE"])
router.add_api_route("/api/embed", embed, methods=["POST"])
router.add_api_route("/api/embeddings", embeddings, methods=["POST"])
for _path, _method in (("/api/copy", "POST"), ("/api/push", "POST"), ("/api/create", "POST"),
                       ("/api/blobs/{digest}", "HEAD"), ("/api/blobs/{digest}", "POST")):
    router.add_api_route(_path, unsupported, methods=[_method], description="unsupported: always 501")

# Ollama also serves the OpenAI routes under /v1, its model list included.
ROUTERS = [router, *openai.ROUTERS]


async def ndjson_events(unit_stream: UnitStream, head: Any, piece):
    try:
        async for chunk in pump(unit_stream, head, None):
            if chunk is None:
                continue
            if chunk.get("delta"):
                yield ndjson(piece(chunk["delta"], False))
            if chunk.get("finish"):
                yield ndjson(piece("", True, chunk))
                break
    except GatewayError as exc:
        yield ndjson({"error": exc.message})
    finally:
        unit_stream.close()
