"""Wyoming (Home Assistant's voice protocol) on the bus: asr, tts, wake and handle from the units."""
from dataclasses import dataclass, field
from typing import Any

from core.registry import FaceInfo, Listener


@dataclass(frozen=True)
class WyomingSettings:
    """[wyoming] in unitbus.toml."""
    bind: str = "127.0.0.1"
    port: int = 10300
    zeroconf: str = "auto"  # advertise _wyoming._tcp: "auto" (only when bound off loopback), true, false
    zeroconf_name: str = ""  # the advertised service name; empty: unitbus-<hostname>
    keep_alive: str = "30m"  # idle time before the server's tasks are unloaded; negative: never
    preload: list[str] = field(default_factory=list)  # models loaded at start and kept
    handle_model: str = ""  # the llm answering `transcript` (empty: the first installed llm)
    handle_prompt: str = "You are a voice assistant. Answer in one or two short sentences."
    handle_max_tokens: int = 160


def listening(settings: Any) -> list[Listener]:
    return [Listener("tcp", settings["wyoming.bind"], int(settings["wyoming.port"]))]


# The `wyoming` package is an optional extra: without it the face is installed but not started.
FACE = FaceInfo("wyoming", "firmware_bridge.wyoming", settings={"wyoming": WyomingSettings}, requires=("wyoming",),
                listens=listening)
