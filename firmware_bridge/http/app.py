"""The app factory: one FastAPI app per enabled listener, all sharing one Gateway (one bus client)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

from core.settings import SettingsError
from firmware_bridge.http import ai00, console, cortex, ollama, openai
from firmware_bridge.http.common import make_app
from firmware_bridge.http.gateway import Gateway

log = logging.getLogger(__name__)

APIS = {"openai": openai, "ollama": ollama, "ai00": ai00, "cortex": cortex}


@dataclass
class Listener:
    api: str
    app: Any  # an ASGI app: a FastAPI app, or console.Combined in front of one
    port: int


def create_app(api: str, gateway: Gateway) -> FastAPI:
    module = APIS[api]
    return make_app(api, gateway, module.ROUTERS, module.render(gateway.settings), getattr(module, "init", None))


def build(gateway: Gateway) -> list[Listener]:
    settings = gateway.settings
    listeners = [Listener(api, create_app(api, gateway), int(settings[f"http.{api}.port"]))
                 for api in APIS if settings[f"http.{api}.enabled"]]
    where = str(settings["http.console"]).strip().lower()
    if where == "openai":
        openai_listeners = [listener for listener in listeners if listener.api == "openai"]
        for listener in openai_listeners:
            listener.app = console.Combined(listener.app, console.create(gateway))
        if not openai_listeners:
            log.warning("no web console: http.console is \"openai\" but the OpenAI listener is off "
                        "(give the console a port of its own)")
    elif where not in ("off", "false", ""):
        if not where.isdigit():
            raise SettingsError(f"http.console: expected openai, off or a port number, got {where!r}")
        listeners.append(Listener("console", console.create(gateway), int(where)))
    return listeners
