"""Speaking Wyoming to a real stack with the `wyoming` package's own AsyncTcpClient."""
from __future__ import annotations

import asyncio
import socket
import time

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.event import Event

from support import Stack, free_port

RATE = 16000
UNITS = ["asr", "kws", "tts", "llm"]


class WyomingStack:
    def __init__(self, stack: Stack, port: int):
        self.stack = stack
        self.port = port

    def client(self) -> AsyncTcpClient:
        return AsyncTcpClient("127.0.0.1", self.port)


def wait_for_port(port: int, stack: Stack, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("the wyoming server did not listen:\n" + stack.log()[-4000:]) from None
            time.sleep(0.1)


def start_wyoming(stack_dir, units=UNITS, settings=None) -> WyomingStack:
    port = free_port()
    stack = Stack(stack_dir, list(units), {"up.wyoming": "true", "wyoming.port": str(port), **(settings or {})})
    stack.start()
    wait_for_port(port, stack)
    return WyomingStack(stack, port)


async def send_audio(client: AsyncTcpClient, pcm: bytes, rate: int = RATE, width: int = 2, channels: int = 1,
                     chunk_s: float = 0.1, realtime: float = 0.0) -> None:
    """audio-start, chunks of `chunk_s`, audio-stop; `realtime` > 0 paces the chunks (1.0 = real time)."""
    await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
    step = int(rate * chunk_s) * width * channels
    for start in range(0, len(pcm), step):
        await client.write_event(AudioChunk(rate=rate, width=width, channels=channels,
                                            audio=pcm[start:start + step]).event())
        if realtime:
            await asyncio.sleep(chunk_s / realtime)
    await client.write_event(AudioStop().event())


async def read_until(client: AsyncTcpClient, *types: str, timeout: float = 120.0) -> list[Event]:
    """Events up to and including the first of `types` (or an error event)."""
    events = []
    while True:
        event = await asyncio.wait_for(client.read_event(), timeout)
        assert event is not None, f"connection closed after {[e.type for e in events]}"
        events.append(event)
        if event.type in types or event.type == "error":
            return events
