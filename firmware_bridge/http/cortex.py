"""Jan / Cortex listener (http-apis.md §5), port 1337: model management in Jan's and Cortex's shapes, plus
the OpenAI chat routes (Jan proxies them)."""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from firmware_bridge.http import openai
from firmware_bridge.http.common import capabilities, read_json, watch
from firmware_bridge.http.errors import GatewayError
from firmware_bridge.http.gateway import Gateway

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


def routes(app: FastAPI) -> None:
    gw: Gateway = app.state.gateway
    settings = gw.settings

    async def find(model_id: Any) -> dict:
        try:
            return await gw.find(model_id)
        except GatewayError as exc:
            if exc.status == 404:
                raise GatewayError(404, "Model not found", code="model_not_found") from None
            raise

    def model_object(manifest: dict, listing: bool) -> dict[str, Any]:
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

    def management() -> None:
        if not settings["http.allow_model_management"]:
            raise GatewayError(403, "model management is disabled")

    def setup_from(body: dict) -> dict[str, Any]:
        config = {**(body.get("settings") or {}), **{k: v for k, v in body.items() if k != "settings"}}
        setup: dict[str, Any] = {}
        for key, value in config.items():
            if key in SETUP_KEYS:
                try:
                    setup[SETUP_KEYS[key]] = int(value)  # Jan's spec sends numbers as strings
                except (TypeError, ValueError):
                    raise GatewayError(400, f"{key}: expected a number") from None
            elif key in ("prompt_template", "engine_parameters") and value:
                raise GatewayError(400, f"{key}: the model's own chat template is used; templates are not replaced")
            elif key not in NO_EFFECT and key != "id":
                log.info("setting %s has no effect", key)
        return setup

    async def start(model_id: Any, body: dict, request: Request) -> None:
        manifest = await find(model_id)
        setup = setup_from(body)
        try:
            await watch(request, gw.acquire(manifest, setup=setup, keep_alive=None))
        except GatewayError as exc:
            if exc.status in (400, 404):
                raise
            raise GatewayError(400, f"Model failed to load: {exc.message}") from None

    async def stop(model_id: Any) -> None:
        manifest = await find(model_id)
        mine = {s.work_id for s in gw.served.values()}
        names = {manifest["mode"], *manifest.get("aliases", [])}
        others = [t["work_id"] for t in await gw.tasks()
                  if str(t.get("work_id", "")).startswith("llm.") and t.get("model") in names
                  and t["work_id"] not in mine]
        if others and gw.state(manifest["mode"]) != "loaded":
            raise GatewayError(409, f"Model in use by {others[0]}")
        await gw.unload(manifest["mode"])

    @app.get("/v1/models")
    async def list_models() -> Response:
        models = [model_object(m, True) for m in await gw.models(("llm",))]
        return JSONResponse({"object": "list", "data": models, "result": "OK"})

    @app.get("/v1/models/status/{model_id:path}")
    async def status(model_id: str) -> Response:
        manifest = await find(model_id)
        if gw.state(manifest["mode"]) == "loaded":
            return JSONResponse({"message": "Model is running"})
        return JSONResponse({"message": "Model has not been loaded"}, status_code=400)

    @app.post("/v1/models/start")
    async def start_body(request: Request) -> Response:
        body = await read_json(request)
        await start(body.get("model"), body, request)
        return JSONResponse({"message": "Started successfully!"})

    @app.post("/v1/models/stop")
    async def stop_body(request: Request) -> Response:
        body = await read_json(request)
        await stop(body.get("model"))
        return JSONResponse({"message": "Stopped successfully!"})

    @app.put("/v1/models/{model_id:path}/start")
    async def start_put(model_id: str, request: Request) -> Response:
        body = await read_json(request, required=False)
        await start(model_id, body, request)
        return JSONResponse({"id": model_id, "object": "model", "state": "running"})

    @app.put("/v1/models/{model_id:path}/stop")
    async def stop_put(model_id: str) -> Response:
        await stop(model_id)
        return JSONResponse({"id": model_id, "object": "model", "state": "stopped"})

    async def installed_or_501(model_id: Any) -> dict:
        try:
            return await find(model_id)
        except GatewayError as exc:
            if exc.status != 404:
                raise
            raise GatewayError(501, "no model source is configured (models.sources)") from None

    @app.post("/v1/models/pull")
    async def pull(request: Request) -> Response:
        management()
        body = await read_json(request)
        manifest = await installed_or_501(body.get("model"))
        return JSONResponse({"message": "Model already downloaded", "task": None, "id": manifest["mode"]})

    @app.delete("/v1/models/pull")
    async def pull_cancel(request: Request) -> Response:
        management()
        raise GatewayError(404, "no download in progress")

    @app.post("/v1/models")
    async def download(request: Request) -> Response:
        management()
        body = await read_json(request)
        manifest = await installed_or_501(body.get("id") or body.get("model"))
        return JSONResponse({"id": manifest["mode"], "object": "model", "state": "downloaded"})

    @app.get("/v1/models/download/{model_id:path}")
    async def download_get(model_id: str) -> Response:
        management()
        manifest = await installed_or_501(model_id)
        return JSONResponse({"message": f"Model {manifest['mode']} is already downloaded"})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        return JSONResponse(model_object(await find(model_id), False))

    @app.patch("/v1/models/{model_id:path}")
    async def update(model_id: str) -> Response:
        management()
        await find(model_id)
        raise GatewayError(501, "updating model defaults is not supported yet")

    @app.delete("/v1/models/{model_id:path}")
    async def delete(model_id: str) -> Response:
        management()
        manifest = await find(model_id)
        await stop(model_id)
        await gw.delete_model(manifest, in_use="Model in use by {}")
        return JSONResponse({"id": manifest["mode"], "object": "model", "deleted": True,
                             "message": "Deleted successfully!"})

    openai.routes(app)
