"""One StackFlow connection (a TCP socket or the UART): bytes in -> frames -> bus requests, replies out.

Transport-independent: the transport hands received bytes to `received` and provides `write` and a
count of bytes still waiting to go out, which bounds what a slow reader can make us hold (spec §13.3).
"""
from __future__ import annotations

import logging
from typing import Callable

from core.client import BusClient
from core.envelope import NONE, EnvelopeError, Response, decode_request, error_reply, is_request
from core.errors import ErrorCode
from core.framing import Frame, Framer, FramingError, nested_requests
from core.settings import Settings

log = logging.getLogger(__name__)


def escapes_braces(setting: object, kind: str) -> bool:
    """framing.escape_braces: "uart" (the default: MCU parsers count braces), true for every
    connection, false for none (spec §4.3)."""
    value = str(setting).strip().lower()
    if value == "uart":
        return kind == "uart"
    return value in ("true", "1", "yes", "on")


class Connection:
    def __init__(self, client: BusClient, settings: Settings, write: Callable[[bytes], None],
                 pending_bytes: Callable[[], int], label: str, kind: str = "tcp"):
        self.client = client
        self.write_bytes = write
        self.pending_bytes = pending_bytes
        self.label = label
        self.escape_braces = escapes_braces(settings["framing.escape_braces"], kind)
        self.max_pending = int(settings["framing.max_pending_bytes"])
        self.framer = Framer(int(settings["framing.max_frame_bytes"]), int(settings["framing.max_raw_bytes"]),
                             float(settings["framing.idle_reset_s"]))
        self.conn = client.open_conn(self.deliver)
        self.dropped: dict[str, str] = {}  # request_id -> work_id of outputs dropped for slowness
        self.closed = False

    def received(self, chunk: bytes) -> None:
        self._events(self.framer.feed(chunk))

    def check_idle(self) -> None:
        self._events(self.framer.check_idle())
        self._report_drops()

    def _events(self, events: list[Frame | FramingError]) -> None:
        for event in events:
            if isinstance(event, Frame):
                try:
                    self._frame(event)
                except Exception as exc:  # a bug costs this frame an error answer, never the frames after it
                    log.exception("%s: frame handling failed", self.label)
                    self.send(error_reply("0", "sys", ErrorCode.OPERATION_FAILED, type(exc).__name__))
            else:
                self.send(error_reply(event.request_id, "sys", event.code, event.detail or None))

    def _frame(self, frame: Frame) -> None:
        try:
            request = decode_request(frame.data)
        except EnvelopeError as exc:
            self.send(error_reply(exc.request_id, exc.work_id, exc))
            if not is_request(frame.data):  # garbage that swallowed requests: answer them (spec §13.1 rule 7)
                for nested in nested_requests(frame.data):
                    self._frame(Frame(nested))
            return
        self.client.submit(request, self.conn, binary=frame.raw)

    def deliver(self, response: Response, final: bool) -> None:
        """A message from the bus for this connection. Outputs (not replies) may be dropped for a slow reader."""
        if self.closed:
            return
        is_output = response.object != NONE and response.code == 0
        if is_output and self.pending_bytes() > self.max_pending:
            self.dropped.setdefault(response.request_id, response.work_id)
            return
        self._report_drops()
        self.send(response)

    def _report_drops(self) -> None:
        if self.dropped and self.pending_bytes() <= self.max_pending // 2:
            for request_id, work_id in list(self.dropped.items()):
                self.send(error_reply(request_id, work_id, ErrorCode.QUEUE_FULL, "output dropped, client too slow"))
            self.dropped.clear()

    def send(self, response: Response) -> None:
        if not self.closed:
            self.write_bytes(response.encode(self.escape_braces))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.client.close_conn(self.conn)
