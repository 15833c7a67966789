"""StackFlow JSON over a UART with pyserial (spec §14.1): one permanent connection.

Reads come from the port's file descriptor on the event loop; writes go through a writer thread so a
115200-baud line never blocks the loop. `sys.uartsetup` arrives as a bus control message and is applied
once everything queued before it has been written.
"""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from typing import Any

from core import bus
from core.client import BusClient
from core.envelope import Response
from core.settings import Settings
from firmware_bridge.connection import Connection

log = logging.getLogger(__name__)

PARITIES = {"n": "N", "e": "E", "o": "O"}


def serial_settings(values: dict[str, Any]) -> dict[str, Any]:
    """unitbus UART settings -> pyserial's apply_settings() dictionary."""
    import serial

    return {
        "baudrate": int(values["baud"]),
        "bytesize": {5: serial.FIVEBITS, 6: serial.SIXBITS, 7: serial.SEVENBITS, 8: serial.EIGHTBITS}[int(values["data_bits"])],
        "parity": PARITIES[str(values["parity"]).lower()[:1]],
        "stopbits": {1: serial.STOPBITS_ONE, 2: serial.STOPBITS_TWO}[int(values["stop_bits"])],
        "xonxoff": False,
        "rtscts": False,
    }


class UartBridge:
    def __init__(self, client: BusClient, settings: Settings, device: str | None = None):
        self.client = client
        self.settings = settings
        self.device = device or settings["uart.device"]
        self.values = {"baud": settings["uart.baud"], "data_bits": settings["uart.data_bits"],
                       "parity": settings["uart.parity"], "stop_bits": settings["uart.stop_bits"]}
        self.port: Any = None
        self.connection: Connection | None = None
        self._outbox: queue.Queue = queue.Queue()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._writer: threading.Thread | None = None
        self._idle_task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    @staticmethod
    def wanted(settings: Settings) -> bool:
        enabled = settings["uart.enabled"]
        if str(enabled).lower() == "auto":
            return os.path.exists(settings["uart.device"])
        return str(enabled).lower() in ("true", "1", "yes", "on")

    async def start(self) -> None:
        import serial

        self.loop = asyncio.get_running_loop()
        self.port = serial.Serial(self.device, timeout=0, write_timeout=None, **serial_settings(self.values))
        self.connection = Connection(self.client, self.settings, self._queue_write, self._pending_bytes,
                                     f"uart {self.device}")
        self.loop.add_reader(self.port.fileno(), self._readable)
        self._writer = threading.Thread(target=self._write_loop, name="uart-writer", daemon=True)
        self._writer.start()
        self._idle_task = asyncio.create_task(self._idle_loop())
        log.info("StackFlow UART on %s at %s", self.device, self.values)

    def on_control(self, message: bus.Control) -> None:
        if message.op == "uartsetup" and isinstance(message.data, dict):
            self.values = {**self.values, **message.data}
            self._outbox.put(("settings", dict(self.values)))
        elif message.op == "notice" and self.connection is not None:
            self.connection.send(Response.from_dict(message.data))

    async def _idle_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self.connection is not None:
                self.connection.check_idle()

    def _readable(self) -> None:
        try:
            data = self.port.read(self.port.in_waiting or 1)
        except Exception as exc:  # the device vanished: stop reading, keep the process up
            log.error("UART read failed: %s", exc)
            assert self.loop is not None
            self.loop.remove_reader(self.port.fileno())
            return
        if data and self.connection is not None:
            try:
                self.connection.received(data)
            except Exception:
                log.exception("UART frame handling failed")

    def _queue_write(self, data: bytes) -> None:
        with self._pending_lock:
            self._pending += len(data)
        self._outbox.put(("data", data))

    def _pending_bytes(self) -> int:
        return self._pending

    def _write_loop(self) -> None:
        while True:
            kind, item = self._outbox.get()
            if kind == "stop":
                return
            try:
                if kind == "data":
                    self.port.write(item)  # one message per write (spec §4.3 rule 8)
                    with self._pending_lock:
                        self._pending -= len(item)
                elif kind == "settings":
                    self.port.flush()
                    self.port.apply_settings(serial_settings(item))
                    log.info("UART settings now %s", item)
            except Exception as exc:
                log.error("UART write failed: %s", exc)

    async def close(self) -> None:
        if self._idle_task:
            self._idle_task.cancel()
        if self.connection is not None:
            self.connection.close()
        if self.port is not None and self.loop is not None:
            self.loop.remove_reader(self.port.fileno())
        self._outbox.put(("stop", None))
        if self._writer is not None:
            await asyncio.to_thread(self._writer.join, 2.0)
        if self.port is not None:
            self.port.close()
