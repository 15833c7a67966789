"""A well-behaved client's sys.ping over TCP while abusive clients run, against the same pings alone.

Abusers (spec §13.3, §14.2): one writes 4 MB of `{}` (2 million empty frames) and never reads, one writes
pings and never reads the answers, one writes brace garbage. Both rows run in this one run, on this
machine, so the ratio is what to read; the bridge's resident memory is shown before and at its peak.
Prints a table; asserts nothing.

    python tests/bench/bench_transport.py [--pings 500]
"""
from __future__ import annotations

import argparse
import os
import random
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from support import Stack, StackFlowClient  # noqa: E402

PING = b'{"request_id":"p","work_id":"sys","action":"ping"}'


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pings(port: int, count: int, bridge: int, peak: list[float]) -> list[float]:
    latencies = []
    with StackFlowClient(port, timeout=60) as c:
        for _ in range(count):
            start = time.perf_counter()
            c.send(PING)
            c.read_line()
            latencies.append(time.perf_counter() - start)
            peak[0] = max(peak[0], rss_mib(bridge))
    return latencies


def abusers(port: int) -> list[socket.socket]:
    rng = random.Random(2)
    garbage = b"".join(bytes(rng.choice(b"{}[]:,ab1 ") for _ in range(rng.randint(1, 12))) for _ in range(20000))
    payloads = [b"{}" * 2_000_000, PING * 200_000, garbage * 10]
    only = os.environ.get("BENCH_ONLY")
    if only:
        payloads = [payloads[int(only)]]
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in payloads]

    def send(sock: socket.socket, data: bytes) -> None:
        try:
            sock.sendall(data)
        except OSError:  # closed at the end of the run while blocked by backpressure
            pass

    for sock, data in zip(socks, payloads):
        threading.Thread(target=send, args=(sock, data), daemon=True).start()
    return socks


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pings", type=int, default=500)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-transport-"))
    stack = Stack(tmp, ["skel"], {"log.level": "WARNING"}).start()
    try:
        bridge = stack.pid_of("bridge")
        pings(stack.port, 50, bridge, [0.0])  # warm up
        before = rss_mib(bridge)
        peak = [before]
        alone = pings(stack.port, args.pings, bridge, peak)
        socks = abusers(stack.port)
        time.sleep(0.5)  # let the floods start
        abused = pings(stack.port, args.pings, bridge, peak)
        for sock in socks:
            sock.close()
    finally:
        stack.stop(check=False)
    print(f"sys.ping over TCP, {args.pings} pings per row, {os.cpu_count()} cores")
    print(f"{'while':>22} | {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}")
    for name, values in (("alone", alone), ("three abusive clients", abused)):
        print(f"{name:>22} | {pct(values, .5):>7.2f} {pct(values, .99):>7.2f} {max(values) * 1000:>7.2f}")
    print(f"ratio p50 {pct(abused, .5) / pct(alone, .5):.2f}x, p99 {pct(abused, .99) / pct(alone, .99):.2f}x; "
          f"bridge RSS {before:.0f} MiB before, {peak[0]:.0f} MiB at peak")


if __name__ == "__main__":
    main()
