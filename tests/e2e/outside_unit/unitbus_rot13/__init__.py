"""rot13: a unit that lives outside the unitbus tree and is found through its entry point."""
from core.registry import UnitInfo

UNIT = UnitInfo("rot13", "unitbus_rot13.unit", serves=("caesar",), manifests="pkg://unitbus_rot13/manifests",
                settings={"rot13.shift": 13})
