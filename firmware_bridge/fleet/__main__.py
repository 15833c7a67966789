"""`python -m firmware_bridge.fleet`: the fleet bridge of this board (off unless fleet.url or fleet.serve)."""
from __future__ import annotations

import asyncio
import logging
import sys

from core import notify
from core.settings import Settings, start_process
from firmware_bridge.fleet.bridge import FleetBridge

log = logging.getLogger(__name__)


async def main_async(settings: Settings) -> int:
    # nats-py waits for an unreachable server itself (a served one may still be starting); what ends
    # the join is refused credentials or a bad setting, and then systemd or `unitbus up` restarts us.
    try:
        bridge = FleetBridge(settings)
    except ValueError as exc:  # fleet.board
        log.error("%s", exc)
        return 2
    try:
        await bridge.start()
    except Exception as exc:
        log.error("could not join the fleet: %s", exc or type(exc).__name__)
        await bridge.close()
        return 1
    await notify.serve_until_stopped(f"board {bridge.board} in the fleet")
    await bridge.close()
    return 0


def main(argv: list[str] | None = None) -> None:
    settings, _ = start_process("unitbus-fleet", "this board's units on NATS", argv)
    sys.exit(asyncio.run(main_async(settings)))


if __name__ == "__main__":
    main()
