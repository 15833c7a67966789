"""rot13line: a face from outside the tree. Each line a TCP client sends is an inference of the rot13 model
through the bridges' shared task pool (loaded once, shared by every connection), and the unit's answer
comes back as a line, or `error <code>: <message>`."""
from __future__ import annotations

import asyncio
import itertools

from core.errors import UnitError
from core.settings import Settings, start_process
from firmware_bridge.pool import TaskPool

MODEL = "rot13"
TASK_SETUP = {"rot13": ("rot13", {"response_format": "rot13.utf-8", "input": "rot13.utf-8", "enoutput": True})}


async def serve(settings: Settings) -> None:
    pool = await TaskPool(settings, name="rot13line", task_setup=TASK_SETUP).start()
    request_ids = itertools.count(1)

    async def answer(line: str) -> str:
        try:
            served = await pool.acquire(await pool.find(MODEL, ("rot13",)))
            return "".join(map(str, await pool.call(served, "rot13.utf-8", line, f"rot13line-{next(request_ids)}")))
        except UnitError as exc:
            return f"error {int(exc.code)}: {exc.message}"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write((await answer(line.decode("utf-8", "replace").rstrip("\r\n")) + "\n").encode())
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, settings["rot13line.bind"], int(settings["rot13line.port"]))
    try:
        async with server:
            await server.serve_forever()
    finally:
        await pool.close()


def main() -> None:
    settings, _ = start_process("rot13line", "StackFlow-free rot13 lines over TCP", None)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
