"""rot13: a unit that lives outside the unitbus tree and is found through its entry point."""
from dataclasses import dataclass

from core.registry import UnitInfo


@dataclass(frozen=True)
class Rot13Settings:
    """[rot13] in unitbus.toml: this package's own settings section, composed by core like the built-in ones."""
    shift: int = 13  # letters are rotated by this much


UNIT = UnitInfo("rot13", "unitbus_rot13.unit", serves=("caesar",), manifests="pkg://unitbus_rot13/manifests",
                settings=Rot13Settings)
