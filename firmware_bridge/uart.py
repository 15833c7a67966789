"""StackFlow JSON over a UART with pyserial (spec §14.1): one permanent connection.

Reads come from the port's file descriptor on the event loop; writes go through a writer thread so a
115200-baud line never blocks the loop. `sys.uartsetup` arrives as a bus control message and is applied
once everything queued before it has been written.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

from core import bus
from core.client import BusClient
from core.envelope import Response
from core.settings import Settings
from firmware_bridge.connection import Connection

log = logging.getLogger(__name__)

BACKPRESSURE_CHECK_S = 0.01  # how often a paused UART looks whether it may read again

PARITIES = {"n": "N", "e": "E", "o": "O"}
DEFAULT_LINE = {"baud": 115200, "data_bits": 8, "parity": "n", "stop_bits": 1}
RESET_PROBE = b"llm uart reset\n"
RESET_ANSWER = b"llm_uart_reset"


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
        self.state_file = Path(settings["uart.state_file"])
        self.persist = bool(settings["uart.persist"])
        self.reset_wait_s = float(settings["uart.reset_wait_s"])
        self.port: Any = None
        self.connection: Connection | None = None
        self.max_pending = int(settings["framing.max_pending_bytes"])
        self._reading = False
        self._failed = False
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
        saved = self._saved_line()
        if saved and saved != DEFAULT_LINE:
            self.values = await asyncio.to_thread(self._recovery_handshake, saved)
        self.port = serial.Serial(self.device, timeout=0, write_timeout=None, **serial_settings(self.values))
        self.connection = Connection(self.client, self.settings, self._queue_write, self._pending_bytes,
                                     f"uart {self.device}", kind="uart")
        self.loop.add_reader(self.port.fileno(), self._readable)
        self._reading = True
        self._writer = threading.Thread(target=self._write_loop, name="uart-writer", daemon=True)
        self._writer.start()
        self._idle_task = asyncio.create_task(self._idle_loop())
        log.info("StackFlow UART on %s at %s", self.device, self.values)

    def _saved_line(self) -> dict[str, Any] | None:
        if not self.persist or not self.state_file.is_file():
            return None
        try:
            saved = json.loads(self.state_file.read_text())
            serial_settings(saved)  # validates
            return {k: saved[k] for k in DEFAULT_LINE}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring %s: %s", self.state_file, exc)
            return None

    def _save_line(self, values: dict[str, Any]) -> None:
        if not self.persist:
            return
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({k: values[k] for k in DEFAULT_LINE}))
            tmp.replace(self.state_file)
        except OSError as exc:
            log.error("could not keep the UART settings in %s: %s", self.state_file, exc)

    def _recovery_handshake(self, saved: dict[str, Any]) -> dict[str, Any]:
        """Spec §14.1: offer the host a way back to 115200 8N1 before using persisted settings."""
        import serial

        with serial.Serial(self.device, timeout=0.05, **serial_settings(DEFAULT_LINE)) as port:
            port.write(RESET_PROBE)
            heard, deadline = b"", time.monotonic() + self.reset_wait_s
            while time.monotonic() < deadline and RESET_ANSWER not in heard:
                heard = (heard + port.read(64))[-256:]
        if RESET_ANSWER in heard:
            log.info("the host asked for the default UART settings back")
            self._save_line(DEFAULT_LINE)
            return dict(DEFAULT_LINE)
        return saved

    def on_control(self, message: bus.Control) -> None:
        if message.op == "uartsetup" and isinstance(message.data, dict):
            self.values = {**self.values, **message.data}
            self._save_line(self.values)
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
            self._failed = True
            self._set_reading(False)
            return
        if data and self.connection is not None:
            try:
                self.connection.received(data)
            except Exception:
                log.exception("UART frame handling failed")
            if self._held_back():
                self._set_reading(False)
                assert self.loop is not None
                self.loop.call_later(BACKPRESSURE_CHECK_S, self._maybe_resume)

    def _held_back(self) -> bool:
        """Backpressure (spec §13.3, §14.2): output over framing.max_pending_bytes, or too much in flight."""
        return self._pending > self.max_pending or (self.connection is not None and self.connection.busy())

    def _maybe_resume(self) -> None:
        if self._failed or self.connection is None or self.connection.closed:
            return
        if self._pending <= self.max_pending // 2 and not self.connection.busy():
            self._set_reading(True)
        else:
            assert self.loop is not None
            self.loop.call_later(BACKPRESSURE_CHECK_S, self._maybe_resume)

    def _set_reading(self, reading: bool) -> None:
        if reading == self._reading or self.loop is None:
            return
        self._reading = reading
        if reading:
            self.loop.add_reader(self.port.fileno(), self._readable)
        else:
            self.loop.remove_reader(self.port.fileno())

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
                    try:
                        self.port.write(item)  # one message per write (spec §4.3 rule 8)
                    finally:
                        # Written or lost, the bytes no longer wait: a failed write must not leave the
                        # count high, or every later output would be dropped as if the host were slow.
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
        if self.port is not None:
            self._failed = True  # no resuming after this
            self._set_reading(False)
        self._outbox.put(("stop", None))
        if self._writer is not None:
            await asyncio.to_thread(self._writer.join, 2.0)
        if self.port is not None:
            self.port.close()
