"""The TCP/UART bridge under careless and hostile clients (spec §13, §14): resync, backpressure, limits."""
from __future__ import annotations

import asyncio
import logging
import random
import threading
import time

import pytest

from core.client import BusClient
from core.envelope import Response
from core.settings import Settings
from firmware_bridge.connection import Connection
from firmware_bridge.uart import UartBridge
from support import StackFlowClient

pytestmark = pytest.mark.e2e


class FlakyPort:
    """A serial port whose first `failures` writes raise, as a UART does when the device hiccups."""

    def __init__(self, failures: int):
        self.failures = failures
        self.written: list[bytes] = []

    def write(self, data: bytes) -> int:
        if self.failures:
            self.failures -= 1
            raise OSError(5, "Input/output error")
        self.written.append(data)
        return len(data)


def test_uart_failed_writes_release_their_bytes_so_output_goes_on(tmp_path):
    settings = Settings.load(tmp_path / "absent.toml", {"framing.max_pending_bytes": "300"}, environ={})
    client = BusClient("ipc://" + str(tmp_path / "none.sock"))
    try:
        uart = UartBridge(client, settings, device=str(tmp_path / "tty"))
        uart.port = FlakyPort(failures=5)
        writer = threading.Thread(target=uart._write_loop, daemon=True)
        writer.start()
        connection = Connection(client, settings, uart._queue_write, uart._pending_bytes, "uart test", kind="uart")
        chunk = Response("r", "llm.1000", "llm.utf-8.stream", {"delta": "x" * 40, "finish": False, "index": 0})
        for failures_left in range(4, -1, -1):  # each of these writes fails (about 230 bytes each)
            connection.deliver(chunk, False)
            deadline = time.monotonic() + 10
            while uart.port.failures > failures_left and time.monotonic() < deadline:
                time.sleep(0.01)
        deadline = time.monotonic() + 10
        while uart._pending_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert uart._pending_bytes() == 0
        connection.deliver(chunk, False)  # the device is back: outputs are written, not dropped as "slow"
        uart._outbox.put(("stop", None))
        writer.join(5)
        assert uart.port.written == [chunk.encode(escape_braces=True)]
        assert not connection.dropped
    finally:
        asyncio.run(client.close())


def test_a_bus_reconnect_logs_a_warning_and_no_traceback(tmp_path, caplog):
    async def run() -> None:
        client = BusClient("ipc://" + str(tmp_path / "no-sys.sock"), heartbeat_s=0.05, liveness_s=0.2)
        await client.start()
        try:
            deadline = time.monotonic() + 10
            while sum("reconnecting" in r.getMessage() for r in caplog.records) < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            await client.close()

    with caplog.at_level(logging.INFO):
        asyncio.run(run())
    assert sum("reconnecting" in r.getMessage() for r in caplog.records) >= 3
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []


def brace_garbage(rng: random.Random) -> bytes:
    """A random frame of garbage with braces (strings in it are whole: none is left open)."""
    pieces = []
    for _ in range(rng.randint(1, 8)):
        roll = rng.random()
        if roll < 0.15:
            pieces.append('"' + "".join(rng.choice("ab {}:") for _ in range(rng.randint(0, 5))).replace("{", "").replace("}", "") + '"')
        elif roll < 0.3:
            pieces.append(rng.choice(['{"a":', '{"a":[', ",", ":", "[", "]", "1", "tru"]))
        else:
            pieces.append("".join(rng.choice("{}{}[]:,ab1 \n#") for _ in range(rng.randint(1, 6))))
    return "".join(pieces).encode()


def test_a_thousand_pings_among_ten_thousand_garbage_frames_are_all_answered(stack_factory):
    stack = stack_factory(["skel"], {"framing.idle_reset_s": "1"})
    rng = random.Random(14)
    pings = {f"p{n}" for n in range(1000)}
    order = ["g"] * 10000 + sorted(pings)
    rng.shuffle(order)
    stream = b"".join(brace_garbage(rng) if item == "g" else
                      b'{"request_id":"%s","work_id":"sys","action":"ping"}%s' % (item.encode(), rng.choice([b"", b"\n"]))
                      for item in order)
    with StackFlowClient(stack.port, timeout=30) as c:
        sender = threading.Thread(target=c.sock.sendall, args=(stream,))
        sender.start()
        seen: set[str] = set()
        while not pings <= seen:
            message = c.read(timeout=30)
            if message["error"]["code"] == 0:
                seen.add(message["request_id"])
        sender.join()
    assert seen == pings  # every ping answered, and nothing else answered as if it were one
