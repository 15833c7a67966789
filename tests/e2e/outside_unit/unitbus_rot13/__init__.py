"""rot13: a unit and a face that live outside the unitbus tree and are found through their entry points."""
from dataclasses import dataclass
from typing import Any

from core.registry import FaceInfo, Listener, UnitInfo


@dataclass(frozen=True)
class Rot13Settings:
    """[rot13] in unitbus.toml: this package's own settings section, composed by core like the built-in ones."""
    shift: int = 13  # letters are rotated by this much


UNIT = UnitInfo("rot13", "unitbus_rot13.unit", serves=("caesar",), manifests="pkg://unitbus_rot13/manifests",
                settings=Rot13Settings)


@dataclass(frozen=True)
class LineSettings:
    """[rot13line] in unitbus.toml: the face's own section."""
    bind: str = "127.0.0.1"
    port: int = 7013


def listening(settings: Any) -> list[Listener]:
    return [Listener("tcp", settings["rot13line.bind"], int(settings["rot13line.port"]))]


FACE = FaceInfo("rot13line", "unitbus_rot13.face", settings={"rot13line": LineSettings}, start_by_default=False,
                listens=listening)
