"""A bounded soak (spec §13, §14, §5.4): well-behaved TCP, UART and HTTP clients keep working while
abusive ones run, a unit and then sys are killed mid-way, and every process's memory comes back.

Well-behaved clients record every request they send and check every message they get: each must answer
one of their own requests (nothing misrouted), and at the end every request has its answer (a reply, a
stream's finish or an error). A prober pings every 20 ms while the abusers run: every ping is answered
(its p50 and p99 are printed, not asserted: the machine is shared). The abusers: 4 MB of `{}` from a client that never reads, random brace-filled garbage, pings
that are never read, and a client that leaves in the middle of its streams.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import statistics
import threading
import time
from pathlib import Path

import pytest
import serial

from support import StackFlowClient, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LOAD_S = 45  # the whole soak; the unit dies at 15 s, sys at 27 s
ABUSE_S = 12  # the abusers and the latency probe run first, before anything is killed
STREAM = {"model": "skel", "response_format": "skel.utf-8.stream", "delay_ms": 5}
MODEL = "smollm2-135m-instruct"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Ledger:
    """What one well-behaved client sent and what came back."""

    def __init__(self, name: str):
        self.name = name
        self.open: dict[str, str] = {}  # request_id -> the work_id it went to
        self.answered = 0
        self.errors: list[str] = []
        self.misrouted: list[dict] = []

    def sent(self, request_id: str, work_id: str) -> None:
        self.open[request_id] = work_id

    def got(self, message: dict) -> bool:
        """True when this message ends its request."""
        request_id = message.get("request_id")
        if request_id not in self.open:
            self.misrouted.append(message)
            return False
        expected = self.open[request_id]
        if message["work_id"] != expected and not (expected in ("skel", "sys") and message["error"]["code"] != 0):
            if not (expected == "skel" and message["work_id"].startswith("skel.")):
                self.misrouted.append(message)
        data = message.get("data")
        done = message["error"]["code"] != 0 or not isinstance(data, dict) or "finish" not in data or data["finish"]
        if done:
            del self.open[request_id]
            self.answered += 1
            if message["error"]["code"] != 0:
                self.errors.append(f'{message["error"]["code"]} {message["error"]["message"]}')
        return done


def well_behaved(name: str, send, read, stop: threading.Event, ledger: Ledger) -> None:
    """Set a skel task up, stream through it, ping; again and again until `stop`, waiting for each answer."""
    n = 0
    work_id = None

    def call(message: dict, timeout: float = 30.0) -> dict:
        ledger.sent(message["request_id"], message["work_id"])
        send(message)
        last = None
        deadline = time.monotonic() + timeout
        while message["request_id"] in ledger.open:
            assert time.monotonic() < deadline, f"{name}: no answer to {message} (last {last})"
            last = read(deadline - time.monotonic())
            ledger.got(last)
        return last

    while not stop.is_set():
        n += 1
        if work_id is None:
            reply = call({"request_id": f"{name}-s{n}", "work_id": "skel", "action": "setup", "data": STREAM})
            if reply["error"]["code"] == 0:
                work_id = reply["work_id"]
            else:
                time.sleep(0.2)  # the unit or sys restarting: try again
                continue
        reply = call({"request_id": f"{name}-i{n}", "work_id": work_id, "action": "inference",
                      "object": "skel.utf-8", "data": f"{{hello}} {name} {n} " + "word " * 20})
        if reply["error"]["code"] in (-6, -9, -4):
            work_id = None  # the task went with its unit
        call({"request_id": f"{name}-p{n}", "work_id": "sys", "action": "ping"})
    if work_id is not None:
        call({"request_id": f"{name}-exit", "work_id": work_id, "action": "exit"})


class UartPeer:
    """The MCU end of the pty pair: JSON out, one line in at a time."""

    def __init__(self, path: Path):
        self.port = serial.Serial(str(path), 115200, timeout=0.2)
        self.buffer = b""

    def send(self, message: dict) -> None:
        self.port.write(json.dumps(message).encode())

    def read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("no line from the UART")
            self.buffer += self.port.read(4096)
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)


def abuse(port: int, stop: threading.Event) -> list[threading.Thread]:
    def flood() -> None:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.settimeout(0.5)
            block, sent = b"{}" * 4096, 0
            while sent < 4 * 1024 * 1024 and not stop.is_set():
                try:
                    s.sendall(block)
                    sent += len(block)
                except (TimeoutError, OSError):
                    continue  # the bridge stopped reading from us: backpressure
            stop.wait()

    def garbage() -> None:
        rng = random.Random(7)
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.settimeout(0.5)
            while not stop.is_set():
                junk = bytes(rng.choice(b'{}[]":,ab\\ 01\n') for _ in range(512))
                try:
                    s.sendall(junk)
                    s.recv(65536)
                except (TimeoutError, OSError):
                    pass
                time.sleep(0.01)

    def never_reads() -> None:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.settimeout(0.5)
            ping = b'{"request_id":"x","work_id":"sys","action":"ping"}'
            while not stop.is_set():
                try:
                    s.sendall(ping * 200)
                except (TimeoutError, OSError):
                    pass
                time.sleep(0.005)

    def leaver() -> None:
        while not stop.is_set():
            try:
                with StackFlowClient(port, timeout=10) as c:
                    reply = c.request({"request_id": "s", "work_id": "skel", "action": "setup",
                                       "data": {**STREAM, "delay_ms": 50}})
                    if reply["error"]["code"] == 0:
                        c.send({"request_id": "i", "work_id": reply["work_id"], "action": "inference",
                                "object": "skel.utf-8", "data": "leaving " * 40})
                        c.read_for("i")
            except (OSError, TimeoutError, AssertionError):
                pass  # it leaves mid-stream either way: closing is the point

    threads = [threading.Thread(target=f, daemon=True) for f in (flood, garbage, never_reads, leaver)]
    for t in threads:
        t.start()
    return threads


def http_client(url: str, stop: threading.Event, outcome: dict) -> None:
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
    outcome.update(done=0, errors=0, left=0)
    n = 0
    while not stop.is_set():
        n += 1
        try:
            stream = client.chat.completions.create(model=MODEL, stream=True, max_tokens=8, temperature=0,
                                                    messages=[{"role": "user", "content": f"Count to {n}."}])
            for i, _chunk in enumerate(stream):
                if n % 3 == 0 and i == 1:
                    stream.close()  # leaves mid-stream
                    outcome["left"] += 1
                    break
            else:
                outcome["done"] += 1
        except openai.APIError:
            outcome["errors"] += 1  # during the kills: answered with an error, not left hanging
            time.sleep(0.2)
        time.sleep(0.3)


def test_soak_mixed_clients_abusers_and_crashes(stack_factory, pty_pair):
    board, mcu = pty_pair
    http_port = free_port()
    stack = stack_factory(["skel", "llm"], {
        "skel.max_tasks": "16", "uart.enabled": "true", "uart.device": str(board), "up.http": "true",
        "http.openai.port": str(http_port), "http.ollama.enabled": "false", "http.ai00.enabled": "false",
        "http.cortex.enabled": "false", "tcp.max_connections": "32"})
    url = f"http://127.0.0.1:{http_port}/v1"
    import openai

    warm = openai.OpenAI(base_url=url, api_key="unused", max_retries=2, timeout=120)
    warm.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "Hi"}])

    stop_clients, stop_abuse = threading.Event(), threading.Event()
    ledgers: list[Ledger] = []
    workers = []
    tcp_clients = [StackFlowClient(stack.port, timeout=30) for _ in range(3)]
    for i, c in enumerate(tcp_clients):
        ledger = Ledger(f"tcp{i}")
        ledgers.append(ledger)
        workers.append(threading.Thread(target=well_behaved, args=(ledger.name, c.send, c.read, stop_clients, ledger)))
    uart = UartPeer(mcu)
    uart_ledger = Ledger("uart")
    ledgers.append(uart_ledger)
    workers.append(threading.Thread(target=well_behaved, args=("uart", uart.send, uart.read, stop_clients, uart_ledger)))
    http_outcome: dict = {}
    workers.append(threading.Thread(target=http_client, args=(url, stop_clients, http_outcome)))

    # Memory at the start: after one of everything has run, so that warm-up is not counted as growth.
    for w in workers:
        w.start()
    time.sleep(3)
    names = ["sys", "bridge", "skel", "llm"]
    before = {name: rss_mb(stack.pid_of(name)) for name in names}

    abusers = abuse(stack.port, stop_abuse)
    latencies = []
    with StackFlowClient(stack.port, timeout=10) as probe:
        end = time.monotonic() + ABUSE_S
        n = 0
        while time.monotonic() < end:
            n += 1
            t0 = time.perf_counter()
            reply = probe.request({"request_id": f"probe{n}", "work_id": "sys", "action": "ping"})
            latencies.append(time.perf_counter() - t0)
            assert reply["error"]["code"] == 0 and reply["request_id"] == f"probe{n}"
            time.sleep(0.02)
    stop_abuse.set()
    for t in abusers:
        t.join(15)

    started = time.monotonic()
    time.sleep(max(0.0, 15 - ABUSE_S))
    os.kill(stack.pid_of("skel"), signal.SIGKILL)  # a unit dies mid-stream
    time.sleep(12)
    os.kill(stack.pid_of("sys"), signal.SIGKILL)  # then the broker itself
    time.sleep(max(0.0, LOAD_S - ABUSE_S - (time.monotonic() - started)))
    stop_clients.set()
    for w in workers:
        w.join(90)
        assert not w.is_alive(), "a well-behaved client was left waiting"

    for ledger in ledgers:
        assert not ledger.misrouted, f"{ledger.name} got others' messages: {ledger.misrouted[:3]}"
        assert not ledger.open, f"{ledger.name}: requests never answered: {ledger.open}"
        assert ledger.answered > 20, f"{ledger.name} made little progress: {ledger.answered}"
    assert http_outcome["done"] > 3 and http_outcome["left"] > 0, http_outcome
    p99 = statistics.quantiles(latencies, n=100)[98]
    print(f"soak: answered {[(le.name, le.answered, len(le.errors)) for le in ledgers]}, http {http_outcome}, "
          f"ping p50 {statistics.median(latencies) * 1000:.1f} ms p99 {p99 * 1000:.1f} ms over {len(latencies)}")

    for c in tcp_clients:
        c.close()
    uart.port.close()
    time.sleep(5)  # the last outputs drain and the clients' connections are gone
    after = {name: rss_mb(stack.pid_of(name)) for name in names}
    print("soak: RSS MB before/after " + ", ".join(f"{n} {before[n]:.1f}/{after[n]:.1f}" for n in names))
    for name in names:
        assert after[name] <= before[name] * 1.10, f"{name}: {before[name]:.1f} MB before, {after[name]:.1f} MB after"
