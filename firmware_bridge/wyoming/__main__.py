"""`python -m firmware_bridge.wyoming`: the Wyoming server, a bus client of sys like the HTTP gateways."""
from __future__ import annotations

import argparse
import asyncio
import logging

from core import logs, notify
from core.settings import Settings, load_for_process
from firmware_bridge.wyoming.server import WyomingServer

log = logging.getLogger(__name__)


async def main_async(settings: Settings) -> None:
    server = await WyomingServer(settings).start()
    log.info("wyoming listening on tcp://%s:%d", server.bind, server.port)
    await notify.serve_until_stopped("wyoming listening")
    await server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="unitbus-wyoming", description="Wyoming server for Home Assistant")
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    settings = load_for_process("unitbus-wyoming", args.config, args.set)
    logs.configure(settings["log.level"], "wyoming")
    asyncio.run(main_async(settings))


if __name__ == "__main__":
    main()
