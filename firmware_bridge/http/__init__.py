"""HTTP gateways: OpenAI (+DecentralGPT), Ollama, Ai00 and Jan/Cortex APIs over the unit bus (http-apis.md)."""
from dataclasses import dataclass, field
from typing import Any

from core.registry import FaceInfo, Listener

MIB = 1024 * 1024
APIS = ("openai", "ollama", "ai00", "cortex")


@dataclass(frozen=True)
class HttpSettings:
    """[http] in unitbus.toml: one process, one listener per API."""
    bind: str = "127.0.0.1"
    console: str = "openai"  # the web console: "openai" (at / of the OpenAI port), a port number, or "off"
    public_url: str = ""
    max_queue: int = 8
    queue_timeout_s: float = 300.0
    keep_alive: str = "5m"
    preload: list[str] = field(default_factory=list)
    abort_load_on_disconnect: bool = False
    sse_keepalive_s: float = 15.0
    api_key: str = ""
    allow_model_management: bool = False
    max_body_bytes: int = 16 * MIB
    max_inflight_per_key: int = 0
    max_inflight_per_ip: int = 0
    header_timeout_s: float = 10.0  # a connection whose request headers take longer is closed
    body_timeout_s: float = 60.0  # a request body not all received this long after its headers: 408
    truncate_history: str = ""


@dataclass(frozen=True)
class OpenAISettings:
    """[http.openai]"""
    enabled: bool = True
    port: int = 8000
    project: str = "unitbus"
    dbc_fields: bool = True
    dbc_strict_status: bool = False


@dataclass(frozen=True)
class OllamaSettings:
    """[http.ollama]"""
    enabled: bool = True
    port: int = 11434
    reported_version: str = "0.12.6"


@dataclass(frozen=True)
class Ai00Settings:
    """[http.ai00]"""
    enabled: bool = True
    port: int = 65530
    model: str = ""
    prompt: str = "ai00"
    secret: str = ""
    app_keys: list[str] = field(default_factory=list)
    expire_sec: int = 86400
    force_pass: bool = False
    embed_model: str = ""
    max_state_streams: int = 4  # /api/models/state streams open at once


@dataclass(frozen=True)
class CortexSettings:
    """[http.cortex]"""
    enabled: bool = True
    port: int = 1337


@dataclass(frozen=True)
class DbcSettings:
    """[http.dbc]: registration with a DecentralGPT node."""
    enabled: bool = False
    node: str = "http://127.0.0.1:6000"
    project: str = "unitbus"
    cid: str = ""
    models: list[str] = field(default_factory=list)
    refresh_s: float = 60.0


def listening(settings: Any) -> list[Listener]:
    bind = settings["http.bind"]
    listeners = [Listener(api, bind, int(settings[f"http.{api}.port"])) for api in APIS if settings[f"http.{api}.enabled"]]
    console = str(settings["http.console"]).strip()
    if console.isdigit():
        listeners.append(Listener("console", bind, int(console)))
    return listeners


FACE = FaceInfo("http", "firmware_bridge.http", requires=("fastapi", "uvicorn"),
                settings={"http": HttpSettings, "http.openai": OpenAISettings, "http.ollama": OllamaSettings,
                          "http.ai00": Ai00Settings, "http.cortex": CortexSettings, "http.dbc": DbcSettings},
                listens=listening)
