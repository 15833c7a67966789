"""The app factory: one FastAPI app per enabled listener, all sharing one Gateway (one bus client)."""
from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI

from firmware_bridge.http import ai00, cortex, ollama, openai
from firmware_bridge.http.common import make_app
from firmware_bridge.http.gateway import Gateway

APIS = {"openai": openai, "ollama": ollama, "ai00": ai00, "cortex": cortex}


@dataclass
class Listener:
    api: str
    app: FastAPI
    port: int


def create_app(api: str, gateway: Gateway) -> FastAPI:
    module = APIS[api]
    return make_app(api, gateway, module.ROUTERS, module.render(gateway.settings), getattr(module, "init", None))


def build(gateway: Gateway) -> list[Listener]:
    settings = gateway.settings
    return [Listener(api, create_app(api, gateway), int(settings[f"http.{api}.port"]))
            for api in APIS if settings[f"http.{api}.enabled"]]
