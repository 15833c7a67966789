"""`python -m firmware_bridge.wyoming`: the Wyoming server, a bus client of sys like the HTTP gateways."""
from __future__ import annotations

import asyncio
import logging

from core import notify
from core.settings import Settings, start_process
from firmware_bridge.wyoming.server import WyomingServer

log = logging.getLogger(__name__)


async def main_async(settings: Settings) -> None:
    server = await WyomingServer(settings).start()
    log.info("wyoming listening on tcp://%s:%d", server.bind, server.port)
    await notify.serve_until_stopped("wyoming listening")
    await server.close()


def main(argv: list[str] | None = None) -> None:
    settings, _ = start_process("unitbus-wyoming", "Wyoming server for Home Assistant", argv)
    asyncio.run(main_async(settings))


if __name__ == "__main__":
    main()
