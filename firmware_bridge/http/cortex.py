"""Jan / Cortex listener (http-apis.md §5), port 1337: model management in Jan's and Cortex's shapes, plus
the OpenAI chat routes (Jan proxies them)."""
from __future__ import annotations

import logging
from typing import Any, Optional

from fastapi import APIRouter
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from core.sampling import INT32_MAX
from firmware_bridge.http import openai
from firmware_bridge.http.common import capabilities, error_responses, gateway, watch
from firmware_bridge.http.errors import GatewayError
from firmware_bridge.http.gateway import Gateway
from firmware_bridge.http.schemas import Body

log = logging.getLogger(__name__)

LIST_STATE = {"available": "ready", "loading": "starting", "loaded": "ready", "unloading": "stopping"}
ONE_STATE = {"available": "downloaded", "loading": "downloaded", "loaded": "running", "unloading": "stopped"}
OPENAI_PREFIXES = ("/v1/chat/", "/v1/completions", "/v1/embeddings", "/v1/audio/", "/v1/images/", "/v1/cancel")
# Load-time settings that map onto llm setup keys; the rest are accepted and logged.
SETUP_KEYS = {"cpu_threads": "threads", "ctx_len": "context_length"}
NO_EFFECT = {"ngl", "n_parallel", "embedding", "caching_enabled", "cache_type", "flash_attn", "mlock", "use_mmap",
             "n_batch", "grp_attn_n", "grp_attn_w", "model_path", "mmproj", "model", "engine"}


def render(settings) -> Any:
    openai_render = openai.render(settings)

    def renderer(exc: GatewayError, path: str = "") -> Response:
        if path.startswith(OPENAI_PREFIXES):
            return openai_render(exc, path)
        return JSONResponse({"message": exc.message, "error": exc.message}, status_code=exc.status,
                            headers=exc.headers())
    return renderer


class StartRequest(Body):
    """Jan and Cortex send load settings flat or under `settings`; numbers may come as strings."""
    model: str
    settings: Optional[dict[str, Any]] = None
    cpu_threads: Optional[int | str] = None
    ctx_len: Optional[int | str] = None


class ModelRequest(Body):
    model: str


class DownloadRequest(Body):
    id: Optional[str] = None
    model: Optional[str] = None


class Message(BaseModel):
    message: str


class Error(BaseModel):
    message: str
    error: str


async def find(gw: Gateway, model_id: Any) -> dict:
    try:
        return await gw.find(model_id)
    except GatewayError as exc:
        if exc.status == 404:
            raise GatewayError(404, "Model not found", code="model_not_found") from None
        raise


def model_object(gw: Gateway, manifest: dict, listing: bool) -> dict[str, Any]:
    meta = gw.meta(manifest)
    params = manifest.get("mode_param", {})
    d = manifest.get("details") or {}
    state = gw.state(manifest["mode"])
    return {
        "id": manifest["mode"], "object": "model", "type": "model", "version": "1",
        "name": d.get("name", manifest["mode"]), "owned_by": "unitbus", "created": int(meta["mtime"]),
        "description": d.get("description", f"{manifest['mode']}, {d.get('quantization_level', '')}".rstrip(", ")),
        "state": (LIST_STATE if listing else ONE_STATE)[state], "status": "downloaded",
        "format": d.get("format", ""), "engine": f"unitbus-{manifest['type']}",
        "source_url": manifest.get("homepage", ""),
        "settings": {"ctx_len": params.get("context_length", 0), "ngl": 0,
                     "embedding": "embed" in capabilities(manifest), "n_parallel": 1},
        "parameters": {"temperature": params.get("temperature"), "token_limit": params.get("max_token_len"),
                       "top_k": params.get("top_k"), "top_p": params.get("top_p"), "stream": True},
        "metadata": {"author": d.get("author", ""), "tags": [manifest["type"]], "size": meta["size"],
                     "quantization": d.get("quantization_level", "")},
        "assets": [v for v in params.values() if isinstance(v, str) and v.startswith("pkg://")],
    }


def management(gw: Gateway) -> None:
    if not gw.settings["http.allow_model_management"]:
        raise GatewayError(403, "model management is disabled")


def setup_from(body: dict) -> dict[str, Any]:
    config = {**(body.get("settings") or {}), **{k: v for k, v in body.items() if k != "settings"}}
    setup: dict[str, Any] = {}
    for key, value in config.items():
        if key in SETUP_KEYS:
            try:
                setup[SETUP_KEYS[key]] = int(value)  # Jan's spec sends numbers as strings
            except (TypeError, ValueError, OverflowError):
                raise GatewayError(400, f"{key}: expected a number") from None
            if not 0 < setup[SETUP_KEYS[key]] <= INT32_MAX:
                raise GatewayError(400, f"{key}: expected a positive number up to {INT32_MAX}")
        elif key in ("prompt_template", "engine_parameters") and value:
            raise GatewayError(400, f"{key}: the model's own chat template is used; templates are not replaced")
        elif key not in NO_EFFECT and key != "id":
            log.info("setting %s has no effect", key)
    return setup


async def start(request: Request, model_id: Any, body: dict) -> None:
    gw = gateway(request)
    manifest = await find(gw, model_id)
    setup = setup_from(body)
    try:
        await watch(request, gw.acquire(manifest, setup=setup, keep_alive=None))
    except GatewayError as exc:
        if exc.status in (400, 404):
            raise
        raise GatewayError(400, f"Model failed to load: {exc.message}") from None


async def stop(gw: Gateway, model_id: Any) -> None:
    manifest = await find(gw, model_id)
    mine = {s.work_id for s in gw.served.values()}
    names = {manifest["mode"], *manifest.get("aliases", [])}
    others = [t["work_id"] for t in await gw.tasks()
              if str(t.get("work_id", "")).startswith("llm.") and t.get("model") in names
              and t["work_id"] not in mine]
    if others and gw.state(manifest["mode"]) != "loaded":
        raise GatewayError(409, f"Model in use by {others[0]}")
    await gw.unload(manifest["mode"])


async def list_models(request: Request) -> Response:
    gw = gateway(request)
    models = [model_object(gw, m, True) for m in await gw.models(("llm",))]
    return JSONResponse({"object": "list", "data": models, "result": "OK"})


async def status(request: Request, model_id: str) -> Response:
    gw = gateway(request)
    manifest = await find(gw, model_id)
    if gw.state(manifest["mode"]) == "loaded":
        return JSONResponse({"message": "Model is running"})
    return JSONResponse({"message": "Model has not been loaded"}, status_code=400)


async def start_body(request: Request, body: StartRequest) -> Response:
    await start(request, body.model, body.fields())
    return JSONResponse({"message": "Started successfully!"})


async def stop_body(request: Request, body: ModelRequest) -> Response:
    await stop(gateway(request), body.model)
    return JSONResponse({"message": "Stopped successfully!"})


async def start_put(request: Request, model_id: str, body: Optional[dict[str, Any]] = None) -> Response:
    await start(request, model_id, body or {})
    return JSONResponse({"id": model_id, "object": "model", "state": "running"})


async def stop_put(request: Request, model_id: str) -> Response:
    await stop(gateway(request), model_id)
    return JSONResponse({"id": model_id, "object": "model", "state": "stopped"})


async def installed_or_501(gw: Gateway, model_id: Any) -> dict:
    try:
        return await find(gw, model_id)
    except GatewayError as exc:
        if exc.status != 404:
            raise
        raise GatewayError(501, "no model source is configured (models.sources)") from None


async def pull(request: Request, body: ModelRequest) -> Response:
    gw = gateway(request)
    management(gw)
    manifest = await installed_or_501(gw, body.model)
    return JSONResponse({"message": "Model already downloaded", "task": None, "id": manifest["mode"]})


async def pull_cancel(request: Request) -> Response:
    management(gateway(request))
    raise GatewayError(404, "no download in progress")


async def download(request: Request, body: DownloadRequest) -> Response:
    gw = gateway(request)
    management(gw)
    manifest = await installed_or_501(gw, body.id or body.model)
    return JSONResponse({"id": manifest["mode"], "object": "model", "state": "downloaded"})


async def download_get(request: Request, model_id: str) -> Response:
    gw = gateway(request)
    management(gw)
    manifest = await installed_or_501(gw, model_id)
    return JSONResponse({"message": f"Model {manifest['mode']} is already downloaded"})


async def get_model(request: Request, model_id: str) -> Response:
    gw = gateway(request)
    return JSONResponse(model_object(gw, await find(gw, model_id), False))


async def update(request: Request, model_id: str) -> Response:
    gw = gateway(request)
    management(gw)
    await find(gw, model_id)
    raise GatewayError(501, "updating model defaults is not supported yet")


async def delete(request: Request, model_id: str) -> Response:
    gw = gateway(request)
    management(gw)
    manifest = await find(gw, model_id)
    await stop(gw, model_id)
    await gw.delete_model(manifest, in_use="Model in use by {}")
    return JSONResponse({"id": manifest["mode"], "object": "model", "deleted": True,
                         "message": "Deleted successfully!"})


# Order matters where paths overlap: the fixed /v1/models/... routes come before /v1/models/{model_id}.
NO_SOURCE = "an installed model succeeds at once; downloading any other is unsupported (501: no model source)"
router = APIRouter(responses=error_responses(Error), tags=["cortex"])
router.add_api_route("/v1/models", list_models, methods=["GET"])
router.add_api_route("/v1/models/status/{model_id:path}", status, methods=["GET"],
                     responses={400: {"model": Message, "description": "the model is not loaded"}})
router.add_api_route("/v1/models/start", start_body, methods=["POST"])
router.add_api_route("/v1/models/stop", stop_body, methods=["POST"])
router.add_api_route("/v1/models/pull", pull, methods=["POST"], description=NO_SOURCE)
router.add_api_route("/v1/models/pull", pull_cancel, methods=["DELETE"])
router.add_api_route("/v1/models", download, methods=["POST"], description=NO_SOURCE)
router.add_api_route("/v1/models/download/{model_id:path}", download_get, methods=["GET"], description=NO_SOURCE)
router.add_api_route("/v1/models/{model_id:path}/start", start_put, methods=["PUT"])
router.add_api_route("/v1/models/{model_id:path}/stop", stop_put, methods=["PUT"])
router.add_api_route("/v1/models/{model_id:path}", get_model, methods=["GET"])
router.add_api_route("/v1/models/{model_id:path}", update, methods=["PATCH"], description="unsupported: always 501")
router.add_api_route("/v1/models/{model_id:path}", delete, methods=["DELETE"])

# Cortex lists models its own way and proxies the OpenAI chat, audio and embedding routes.
ROUTERS = [router, openai.router]
