"""`python -m firmware_bridge`: the StackFlow bridge (TCP 10001 and the UART) as one bus client."""
from __future__ import annotations

import core.notls  # noqa: F401  (before anything imports asyncio)
import asyncio
import logging

from core import notify
from core.client import BusClient
from core.settings import Settings, start_process
from firmware_bridge.tcp import TcpServer
from firmware_bridge.uart import UartBridge

log = logging.getLogger(__name__)


async def main_async(settings: Settings, uart_device: str | None) -> None:
    use_uart = uart_device is not None or UartBridge.wanted(settings)
    client = BusClient.for_settings(settings, "bridge", features=("uart",) if use_uart else ())
    await client.start()
    parts: list = []
    if settings["tcp.enabled"]:
        tcp = TcpServer(client, settings)
        await tcp.start()
        parts.append(tcp)
    if use_uart:
        uart = UartBridge(client, settings, uart_device)
        await uart.start()
        client.on_control = uart.on_control
        parts.append(uart)
    await notify.serve_until_stopped("bridge listening")
    for part in parts:
        await part.close()
    await client.close()


def main(argv: list[str] | None = None) -> None:
    settings, args = start_process(
        "unitbus-bridge", "StackFlow over TCP and UART", argv,
        lambda parser: parser.add_argument("--uart", help="serial device (overrides uart.device and enables the UART)"))
    asyncio.run(main_async(settings, args.uart))


if __name__ == "__main__":
    main()
