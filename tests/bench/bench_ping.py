"""sys.ping round trip over TCP through bridge and sys, against a bare asyncio + pyzmq echo.

The peer has the same shape as unitbus's path (TCP server process -> ZeroMQ -> broker process and
back) with nothing else: no framing, no envelope codec, no routing. Both run in this one run, on this
machine, so the ratio is what to read. Prints a table; asserts nothing.

    python tests/bench/bench_ping.py [--requests 2000]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from support import Stack, free_port  # noqa: E402

PING = b'{"request_id":"p","work_id":"sys","action":"ping","object":"None","data":"None"}'

PEER = r'''
import asyncio, sys, zmq, zmq.asyncio
endpoint, port, role = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = zmq.asyncio.Context()

async def broker():
    sock = ctx.socket(zmq.ROUTER); sock.bind(endpoint)
    while True:
        frames = await sock.recv_multipart()
        await sock.send_multipart(frames)

async def bridge():
    sock = ctx.socket(zmq.DEALER); sock.connect(endpoint)
    waiting = {}
    async def pump():
        while True:
            tag, body = await sock.recv_multipart()
            waiting.pop(tag).write(body + b"\n")
    async def serve(reader, writer):
        n = 0
        key = str(id(writer)).encode()
        while True:
            line = await reader.readline()
            if not line:
                return
            n += 1
            tag = key + b":" + str(n).encode()
            waiting[tag] = writer
            await sock.send_multipart([tag, line.rstrip(b"\n")])
    asyncio.ensure_future(pump())
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    print("ready", flush=True)
    await server.serve_forever()

asyncio.run(broker() if role == "broker" else bridge())
'''


async def one_client(port: int, count: int, newline: bool, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    message = PING + (b"\n" if newline else b"")
    for _ in range(count):
        start = time.perf_counter()
        writer.write(message)
        await reader.readline()
        latencies.append(time.perf_counter() - start)
    writer.close()


async def measure(port: int, clients: int, total: int, newline: bool) -> tuple[list[float], float]:
    latencies: list[float] = []
    await one_client(port, 50, newline, [])  # warm up
    start = time.perf_counter()
    await asyncio.gather(*(one_client(port, total // clients, newline, latencies) for _ in range(clients)))
    return latencies, len(latencies) / (time.perf_counter() - start)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ping-"))
    stack = Stack(tmp, ["skel"], {"log.level": "WARNING"}).start()
    peer_port = free_port()
    endpoint = f"ipc://{tmp}/peer.sock"
    script = tmp / "peer.py"
    script.write_text(PEER)
    peers = [subprocess.Popen([sys.executable, str(script), endpoint, str(peer_port), "broker"])]
    bridge = subprocess.Popen([sys.executable, str(script), endpoint, str(peer_port), "bridge"], stdout=subprocess.PIPE, text=True)
    peers.append(bridge)
    assert bridge.stdout is not None and bridge.stdout.readline().strip() == "ready"
    rows = []
    try:
        for clients in (1, 16):
            ours, our_rps = asyncio.run(measure(stack.port, clients, args.requests, newline=False))
            bare, bare_rps = asyncio.run(measure(peer_port, clients, args.requests, newline=True))
            rows.append((clients, ours, our_rps, bare, bare_rps))
    finally:
        for p in peers:
            p.terminate()
        stack.stop(check=False)
    print(f"sys.ping over TCP, {args.requests} requests per row, {os.cpu_count()} cores")
    print(f"{'clients':>7} | {'unitbus p50 ms':>14} {'p99 ms':>7} {'req/s':>7} | {'bare p50 ms':>11} {'p99 ms':>7} "
          f"{'req/s':>7} | {'p50 ratio':>9} {'p99 ratio':>9} {'req/s ratio':>11}")
    for clients, ours, our_rps, bare, bare_rps in rows:
        print(f"{clients:>7} | {pct(ours, .5):>14.3f} {pct(ours, .99):>7.3f} {our_rps:>7.0f} | {pct(bare, .5):>11.3f} "
              f"{pct(bare, .99):>7.3f} {bare_rps:>7.0f} | {pct(ours, .5) / pct(bare, .5):>8.2f}x "
              f"{pct(ours, .99) / pct(bare, .99):>8.2f}x {our_rps / bare_rps:>10.2f}x")
    print("target: p50 ratio <= 2x")


if __name__ == "__main__":
    main()
