"""One StackFlow connection (a TCP socket or the UART): bytes in -> frames -> bus requests, replies out.

Transport-independent: the transport hands received bytes to `received` and provides `write` and a
count of bytes still waiting to go out, which bounds what a slow reader can make us hold (spec §13.3).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from core.client import BusClient
from core.envelope import NONE, EnvelopeError, Response, decode_request, error_reply
from core.errors import ErrorCode, UnitError
from core.framing import Frame, Framer, FramingError, nested_requests
from core.settings import Settings

log = logging.getLogger(__name__)

# Error replies that answer no request (request_id "0": framing errors, frames without a request_id) are
# rate-limited per connection (spec §13.3): a burst of this many, then this many per second; the rest are
# counted and the count is told with the next one sent.
ERROR_BURST = 32
ERROR_RATE_PER_S = 32.0
# A connection with this many requests on the bus is not read from until some end (spec §14.2), so a
# client that pipelines without reading cannot queue unbounded work ahead of everyone else's.
MAX_IN_FLIGHT = 256


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
        self.last_activity = time.monotonic()  # a byte received or a message sent
        self.tasks: set[str] = set()  # work_ids this connection set up and did not exit (maybe more)
        self._setups: set[str] = set()  # request_ids of setups and resets awaiting their reply
        self._exits: dict[str, str] = {}  # request_id -> work_id of exits awaiting their reply
        self._error_tokens = float(ERROR_BURST)
        self._error_refill_at = self.last_activity
        self._errors_suppressed = 0
        self._suppressed_code = ErrorCode.JSON_FORMAT
        self._in_flight: set[int] = set()  # tags of submitted requests, pruned when it reaches MAX_IN_FLIGHT

    def received(self, chunk: bytes) -> None:
        self.last_activity = time.monotonic()
        self._events(self.framer.feed(chunk))

    def check_idle(self) -> None:
        self._events(self.framer.check_idle())
        self._report_drops()
        if self._errors_suppressed and self._error_allowed():
            self._send_error("0", "sys", UnitError(self._suppressed_code))

    def busy(self) -> bool:
        """MAX_IN_FLIGHT requests of this connection have not ended: read nothing more for now."""
        if len(self._in_flight) >= MAX_IN_FLIGHT:
            self._in_flight = {tag for tag in self._in_flight if self.client.in_flight(tag)}
        return len(self._in_flight) >= MAX_IN_FLIGHT

    @property
    def idle_s(self) -> float:
        return time.monotonic() - self.last_activity

    def _error_allowed(self) -> bool:
        now = time.monotonic()
        self._error_tokens = min(ERROR_BURST, self._error_tokens + (now - self._error_refill_at) * ERROR_RATE_PER_S)
        self._error_refill_at = now
        if self._error_tokens < 1:
            return False
        self._error_tokens -= 1
        return True

    def _send_error(self, request_id: str, work_id: str, error: UnitError) -> None:
        """An error reply; those that answer no request are rate-limited (ERROR_BURST, ERROR_RATE_PER_S)."""
        if request_id == "0":
            if not self._error_allowed():
                self._errors_suppressed += 1
                self._suppressed_code = error.code
                return
            if self._errors_suppressed:
                note = f"{self._errors_suppressed} more error replies without a request_id not sent (rate limit)"
                error = UnitError(error.code, message=f"{error.message}; {note}")
                self._errors_suppressed = 0
        self.send(error_reply(request_id, work_id, error))

    def _events(self, events: list[Frame | FramingError]) -> None:
        for event in events:
            if isinstance(event, Frame):
                try:
                    self._frame(event)
                except Exception as exc:  # a bug costs this frame an error answer, never the frames after it
                    log.exception("%s: frame handling failed", self.label)
                    self._send_error("0", "sys", UnitError(ErrorCode.OPERATION_FAILED, type(exc).__name__))
            else:
                self._send_error(event.request_id, "sys", UnitError(event.code, event.detail or None))

    def _frame(self, frame: Frame) -> None:
        try:
            request = decode_request(frame.data)
        except EnvelopeError as exc:
            self._send_error(exc.request_id, exc.work_id, exc)
            if not exc.request:  # garbage that swallowed requests: answer them (spec §13.1 rule 7)
                for nested in nested_requests(frame.data):
                    self._frame(Frame(nested))
            return
        if request.action == "setup" or (request.action == "reset" and request.unit == "sys"):
            self._setups.add(request.request_id)
        elif request.action == "exit":
            self._exits[request.request_id] = request.work_id
        self._in_flight.add(self.client.submit(request, self.conn, binary=frame.raw))

    def deliver(self, response: Response, final: bool) -> None:
        """A message from the bus for this connection. Outputs (not replies) may be dropped for a slow reader."""
        if self.closed:
            return
        self._track_tasks(response)
        is_output = response.object != NONE and response.code == 0
        if is_output and self.pending_bytes() > self.max_pending:
            self.dropped.setdefault(response.request_id, response.work_id)
            return
        self._report_drops()
        self.send(response)

    def _track_tasks(self, response: Response) -> None:
        """Which tasks this connection owns, from its setup, exit and reset replies (for the idle timeout)."""
        if response.request_id in self._setups:
            self._setups.discard(response.request_id)
            if response.code == 0 and response.work_id == "sys":  # sys.reset: every task is gone
                self.tasks.clear()
            elif response.code == 0:
                self.tasks.add(response.work_id)
        elif response.request_id in self._exits and response.code == 0:
            self.tasks.discard(self._exits.pop(response.request_id))

    def _report_drops(self) -> None:
        if self.dropped and self.pending_bytes() <= self.max_pending // 2:
            for request_id, work_id in list(self.dropped.items()):
                self.send(error_reply(request_id, work_id, ErrorCode.QUEUE_FULL, "output dropped, client too slow"))
            self.dropped.clear()

    def send(self, response: Response) -> None:
        if not self.closed:
            self.last_activity = time.monotonic()
            self.write_bytes(response.encode(self.escape_braces))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.client.close_conn(self.conn)
