"""rot13line: a face from outside the tree. Each line a TCP client sends goes to one rot13 task on the
bus, and the unit's answer comes back as a line, or `error <code>: <message>`."""
from __future__ import annotations

import argparse
import asyncio

from core import logs
from core.client import BusClient
from core.errors import UnitError
from core.settings import Settings, load_for_process

SETUP = {"model": "rot13", "response_format": "rot13.utf-8", "input": "rot13.utf-8", "enoutput": True}


async def serve(settings: Settings) -> None:
    async with BusClient.for_settings(settings, "rot13line") as client:
        task = None

        async def answer(line: str) -> str:
            nonlocal task
            try:
                if task is None:
                    task = (await client.call("rot13", "setup", SETUP, timeout=60.0)).work_id
                reply = await client.call(task, "inference", line, object="rot13.utf-8")
            except UnitError as exc:
                return f"error {int(exc.code)}: {exc.message}"
            return str(reply.data)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while line := await reader.readline():
                writer.write((await answer(line.decode("utf-8", "replace").rstrip("\r\n")) + "\n").encode())
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, settings["rot13line.bind"], int(settings["rot13line.port"]))
        async with server:
            await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(prog="rot13line")
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    settings = load_for_process("rot13line", args.config, args.set)
    logs.configure(settings["log.level"], "rot13line")
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
