"""The TCP/UART bridge under careless and hostile clients (spec §13, §14): resync, backpressure, limits."""
from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time

import pytest
import serial

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


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError(pid)


def send_until_closed(client: StackFlowClient, data: bytes) -> None:
    try:
        client.sock.sendall(data)
    except OSError:  # the test closed the socket while backpressure held the write
        pass


def test_floods_from_clients_that_never_read_keep_the_bridge_small_and_others_answered(skel_stack):
    bridge = skel_stack.pid_of("bridge")
    with StackFlowClient(skel_stack.port) as pinger:
        assert pinger.request({"request_id": "warm", "work_id": "sys", "action": "ping"})["error"]["code"] == 0
        before = rss_kib(bridge)
        flood = StackFlowClient(skel_stack.port)  # 2 million empty frames, never reads its error replies
        greedy = StackFlowClient(skel_stack.port)  # 100,000 pings, never reads the answers
        senders = [threading.Thread(target=send_until_closed, args=(flood, b"{}" * 2_000_000), daemon=True),
                   threading.Thread(target=send_until_closed, daemon=True,
                                    args=(greedy, b'{"request_id":"g","work_id":"sys","action":"ping"}' * 100_000))]
        for sender in senders:
            sender.start()
        peak = before
        try:
            for n in range(200):
                reply = pinger.request({"request_id": f"p{n}", "work_id": "sys", "action": "ping"}, timeout=30)
                assert reply["error"]["code"] == 0
                peak = max(peak, rss_kib(bridge))
        finally:
            flood.close()
            greedy.close()
        for sender in senders:
            sender.join(10)
        assert pinger.request({"request_id": "after", "work_id": "sys", "action": "ping"})["error"]["code"] == 0
    # Unbounded, the error replies alone were 240 MB; bounded, the bridge holds about a read and 1 MiB of output.
    assert peak - before < 40 * 1024, f"bridge grew from {before} to {peak} KiB"


def test_error_replies_without_a_request_id_are_rate_limited_and_counted(skel_stack):
    with StackFlowClient(skel_stack.port) as c:
        c.send(b"{}" * 5000 + b'{"request_id":"last","work_id":"sys","action":"ping"}')
        errors = []
        while True:
            message = c.read(timeout=30)
            if message["request_id"] == "last":
                break
            errors.append(message)
        assert 0 < len(errors) < 200 and all(m["error"]["code"] == -2 for m in errors)
        errors.append(c.read(timeout=30))  # once the limit allows: how many of the last ones were not sent
        assert errors[-1]["request_id"] == "0" and "not sent (rate limit)" in errors[-1]["error"]["message"]
        notes = [m["error"]["message"].split("; ")[1] for m in errors if "; " in m["error"]["message"]]
        # Every error was sent or counted (the last message is only the count).
        assert len(errors) - 1 + sum(int(note.split()[0]) for note in notes) == 5000


def test_one_address_cannot_take_every_connection_slot(stack_factory):
    stack = stack_factory(["skel"], {"tcp.max_connections": "4", "tcp.max_connections_per_address": "2"})
    deadline = time.monotonic() + 10
    while True:  # `unitbus up` probed the port before announcing itself: wait until that slot is free
        mine = [StackFlowClient(stack.port) for _ in range(4)]
        try:
            if all(c.request({"request_id": "1", "work_id": "sys", "action": "ping"})["error"]["code"] == 0
                   for c in mine):
                break
        except ConnectionError:
            pass
        for c in mine:
            c.close()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    owner = mine[0]  # owns a task: never the one closed to make room
    assert owner.request({"request_id": "s", "work_id": "skel", "action": "setup", "data": {"model": "skel"}})["error"]["code"] == 0
    try:
        with StackFlowClient(stack.port) as fifth:  # the same address, over its share: refused
            refused = fifth.read()
            assert refused["error"]["code"] == -10 and "too many connections" in refused["error"]["message"]
        with StackFlowClient(stack.port, source=("127.0.0.2", 0)) as other:  # another address gets a slot
            assert other.request({"request_id": "2", "work_id": "sys", "action": "ping"})["error"]["code"] == 0
        with pytest.raises(ConnectionError):
            mine[1].read(timeout=30)  # the quietest connection without a task made room, without a message
        for c in (owner, *mine[2:]):
            assert c.request({"request_id": "3", "work_id": "sys", "action": "ping"})["error"]["code"] == 0
    finally:
        for c in mine:
            c.close()


def test_idle_connections_without_a_task_are_closed(stack_factory):
    stack = stack_factory(["skel"], {"tcp.idle_timeout_s": "1"})
    with StackFlowClient(stack.port) as idle, StackFlowClient(stack.port) as owner:
        setup = owner.request({"request_id": "s", "work_id": "skel", "action": "setup", "data": {"model": "skel"}})
        assert setup["error"]["code"] == 0
        with pytest.raises(ConnectionError):
            idle.read(timeout=30)  # closed by the bridge, without a message
        assert owner.request({"request_id": "p", "work_id": "sys", "action": "ping"})["error"]["code"] == 0


def test_an_mcu_that_never_reads_is_held_back_and_tcp_clients_are_answered(stack_factory, pty_pair):
    board, mcu = pty_pair
    stack = stack_factory(["skel"], {"uart.enabled": "true", "uart.device": str(board)})
    bridge = stack.pid_of("bridge")
    with serial.Serial(str(mcu), 115200, timeout=0.1, write_timeout=None) as port, \
            StackFlowClient(stack.port) as pinger:
        assert pinger.request({"request_id": "warm", "work_id": "sys", "action": "ping"})["error"]["code"] == 0
        before = peak = rss_kib(bridge)

        def flood() -> None:
            try:
                port.write(b'{"request_id":"u","work_id":"sys","action":"ping"}' * 100_000)
            except Exception:  # pyserial raises several kinds when the port is closed under a blocked write
                pass

        writer = threading.Thread(target=flood, daemon=True)
        writer.start()
        n, watch_until = 0, time.monotonic() + 4  # long enough for an unbounded queue to grow by far more
        while n < 300 or time.monotonic() < watch_until:
            assert pinger.request({"request_id": f"p{n}", "work_id": "sys", "action": "ping"})["error"]["code"] == 0
            peak = max(peak, rss_kib(bridge))
            n += 1
        assert writer.is_alive()  # backpressure: the bridge stopped reading, so the MCU's write is held
        first = json.loads(port.readline())  # the MCU's answers were held, not lost
        assert first["request_id"] == "u" and first["error"]["code"] == 0
    # Unbounded, the answers queued for the UART writer grew by 8 MB in those seconds (13 MB in all).
    assert peak - before < 4 * 1024, f"bridge grew from {before} to {peak} KiB"


def test_values_the_bus_cannot_carry_are_answered_minus_2_with_the_clients_ids(skel_stack):
    deep = b"[" * 100 + b"]" * 100
    with StackFlowClient(skel_stack.port) as c:
        for n, data in enumerate([b"18446744073709551616", b"9223372036854775808", b"-9223372036854775809",
                                  b"NaN", b"[Infinity]", deep, b'"\\ud800"', b'{"\\udfff":1}']):
            c.send(b'{"request_id":"v%d","work_id":"skel.1000","action":"inference","data":%s}' % (n, data))
            reply = c.read_for(f"v{n}")
            assert (reply["error"]["code"], reply["work_id"]) == (-2, "skel.1000"), (data, reply)
        assert c.request({"request_id": "p", "work_id": "sys", "action": "ping"})["error"]["code"] == 0
