"""Which requests sys hands to the fleet bridge (protocol.md §21): the bridge is the unit `fleet`."""
from __future__ import annotations

from typing import Any

from core.envelope import Request
from core.ids import ANY_BOARD, is_task_id, split_board
from core.microphone import PCM_SOURCE
from core.settings import Settings

FLEET_UNIT = "fleet"
IMPORT = "import"  # sys -> fleet bridge: bring these remote sources here before a setup or link uses them
IMPORTED = "imported"  # fleet bridge -> sys: done ({"key", "error"})
IMPORT_DONE = "import_done"  # sys -> fleet bridge: the request that needed these sources was answered
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


def remote_source(text: str) -> bool:
    """A source on a board that a local task can take as input: 'asr.1001@mic' or 'sys.pcm@mic'."""
    local, board = split_board(text)
    return board not in (None, "", ANY_BOARD) and (is_task_id(local) or local == PCM_SOURCE)


def remote_inputs(request: Request) -> list[str]:
    """The remote sources a setup's `input` or a link's data names (the fleet bridge imports them first)."""
    data: Any = request.data
    if request.action == "setup" and isinstance(data, dict):
        entries = data.get("input")
        entries = [entries] if isinstance(entries, str) else entries if isinstance(entries, list) else []
    elif request.action == "link":
        entries = [data]
    else:
        return []
    return sorted({e for e in entries if isinstance(e, str) and remote_source(e)})
