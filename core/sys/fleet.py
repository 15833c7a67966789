"""Which requests sys hands to the fleet bridge (protocol.md §21): the bridge is the unit `fleet`."""
from __future__ import annotations

from core.envelope import Request
from core.ids import split_board
from core.settings import Settings

FLEET_UNIT = "fleet"
FLEET_WIDE = frozenset({"lstask", "lsmode", "hwinfo"})  # sys actions that can list every board


def wants_fleet(request: Request) -> bool:
    """A work_id on another board (`llm@kitchen`, `llm.1003@kitchen`), or a fleet-wide sys listing."""
    if split_board(request.work_id)[1] is not None:
        return True
    return (request.unit == "sys" and request.action in FLEET_WIDE and isinstance(request.data, dict)
            and request.data.get("fleet") is True)


def fleet_timeout(request: Request, settings: Settings) -> float | None:
    """sys's deadline for the bridge's answer; the bridge itself fails what a vanished board leaves."""
    if request.action == "inference":
        return None
    if request.action == "setup":
        return float(settings["timeouts.setup_s"])
    return float(settings["timeouts.control_s"]) + 2.0  # hwinfo samples the CPU for a second on each board
