"""The fleet over NATS: what crossing boards costs, measured against the same thing without it, in one run.

- tok/s of a stream from a task on another board vs the same board's task asked locally (StackFlow TCP);
- sys.ping p50 across boards (`sys@beta` from alpha's TCP port) vs a bare nats-py request-reply echo
  between two processes on the same nats-server;
- 8 load-balanced streams (`llm@*`) over 2 boards vs over 1, aggregate tok/s.
Every engine runs on --threads onnxruntime threads (1: this 2-core machine then has a core per board).
Prints a table; asserts nothing.

    python tests/bench/bench_fleet.py [--tokens 64] [--rounds 3] [--pings 500] [--threads 1]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "bench"))

from bench_http import MESSAGES, MODEL, best, load_engine, measure  # noqa: E402
from fleet_support import TOKEN, NatsServer, board, wait_joined  # noqa: E402
from support import StackFlowClient  # noqa: E402

ECHO = r'''
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1], token=sys.argv[2])
    async def echo(msg):
        await msg.respond(msg.data)
    await nc.subscribe("bench.echo", cb=echo)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
'''


def chat(tokens: int, bias: dict) -> dict:
    return {"messages": MESSAGES, "max_tokens": tokens, "temperature": 0, "logit_bias": bias}


def stream_once(c: StackFlowClient, work_id: str, request_id: str, data: dict) -> dict:
    started = time.perf_counter()
    first = None
    c.send({"request_id": request_id, "work_id": work_id, "action": "inference", "object": "llm.chat_completion",
            "data": data})
    while True:
        message = c.read_for(request_id)
        assert message["error"]["code"] == 0, message
        if first is None and message["data"].get("delta"):
            first = time.perf_counter()
        if message["data"].get("finish"):
            break
    return measure(started, first, time.perf_counter(), message["data"]["usage"]["completion_tokens"])


def remote_vs_local(alpha, beta, tokens: int, rounds: int, bias: dict) -> dict[str, dict]:
    rows: dict[str, list[dict]] = {"local (beta's client)": [], "remote (alpha's client, llm@beta)": []}
    setup = {"model": MODEL, "response_format": "llm.utf-8.stream", "enoutput": True}
    with StackFlowClient(beta.port, timeout=300) as local, StackFlowClient(alpha.port, timeout=300) as remote:
        here = local.request({"request_id": "s", "work_id": "llm", "action": "setup", "data": setup})["work_id"]
        there = remote.request({"request_id": "s", "work_id": "llm@beta", "action": "setup", "data": setup})["work_id"]
        stream_once(local, here, "warm", chat(4, bias))
        for n in range(rounds):
            rows["local (beta's client)"].append(stream_once(local, here, f"l{n}", chat(tokens, bias)))
            rows["remote (alpha's client, llm@beta)"].append(stream_once(remote, there, f"r{n}", chat(tokens, bias)))
        local.request({"request_id": "x", "work_id": here, "action": "exit"})
        remote.request({"request_id": "x", "work_id": there, "action": "exit"})
    return {name: best(r) for name, r in rows.items()}


def ping_across(alpha, count: int) -> list[float]:
    out = []
    with StackFlowClient(alpha.port, timeout=30) as c:
        for n in range(count + 20):
            started = time.perf_counter()
            reply = c.request({"request_id": f"p{n}", "work_id": "sys@beta", "action": "ping"})
            if n >= 20:  # the first ones warm up the path
                out.append(time.perf_counter() - started)
            assert reply["error"]["code"] == 0, reply
    return out


def bare_echo(url: str, count: int) -> list[float]:
    import nats

    responder = subprocess.Popen([sys.executable, "-c", ECHO, url, TOKEN], stdout=subprocess.PIPE, text=True)
    try:
        assert responder.stdout is not None and responder.stdout.readline().strip() == "ready"

        async def run() -> list[float]:
            nc = await nats.connect(url, token=TOKEN)
            out = []
            for n in range(count + 20):
                started = time.perf_counter()
                await nc.request("bench.echo", b'{"request_id":"p","work_id":"sys","action":"ping"}', timeout=5)
                if n >= 20:
                    out.append(time.perf_counter() - started)
            await nc.close()
            return out

        return asyncio.run(run())
    finally:
        responder.terminate()
        responder.wait()


def balanced(alpha, streams: int, tokens: int, bias: dict, boards_expected: int) -> tuple[float, dict[str, int]]:
    """Aggregate tok/s of `streams` concurrent llm@* streams sent from alpha; which boards ran them."""
    data = {"model": MODEL, "input": chat(tokens, bias)}
    boards: dict[str, int] = {}
    total = 0
    with StackFlowClient(alpha.port, timeout=600) as c:
        # Load the model on every board first (a busy board hands the second one on): not measured.
        for n in range(boards_expected):
            c.send({"request_id": f"warm{n}", "work_id": "llm@*", "action": "inference",
                    "object": "llm.chat_completion", "data": {**data, "input": chat(4, bias)}})
        for n in range(boards_expected):
            c.stream(f"warm{n}")
        started = time.perf_counter()
        for n in range(streams):
            c.send({"request_id": f"b{n}", "work_id": "llm@*", "action": "inference",
                    "object": "llm.chat_completion", "data": data})
        for n in range(streams):
            chunks = c.stream(f"b{n}", timeout=600)
            assert chunks[-1]["error"]["code"] == 0, chunks[-1]
            total += chunks[-1]["data"]["usage"]["completion_tokens"]
            name = chunks[0]["work_id"].rsplit("@", 1)[1]
            boards[name] = boards.get(name, 0) + 1
        elapsed = time.perf_counter() - started
    return total / elapsed, boards


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pings", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads of each board's engine")
    parser.add_argument("--streams", type=int, default=8)
    args = parser.parse_args()

    engine, bias = load_engine(1)
    del engine
    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    server = NatsServer(tmp)
    env = {"UNITBUS_THREADS": str(args.threads)}
    alpha = board(tmp / "alpha", "alpha", server.url, env=env).start(timeout=300)
    beta = None
    try:
        wait_joined(alpha, "alpha")
        one_board, _ = balanced(alpha, args.streams, args.tokens, bias, 1)
        beta = board(tmp / "beta", "beta", server.url, env=env).start(timeout=300)
        wait_joined(alpha, "alpha", "beta")
        two_boards, used = balanced(alpha, args.streams, args.tokens, bias, 2)
        streams = remote_vs_local(alpha, beta, args.tokens, args.rounds, bias)
        across = ping_across(alpha, args.pings)
        echo = bare_echo(server.url, args.pings)
    finally:
        if beta is not None:
            beta.stop(check=False)
        alpha.stop(check=False)
        server.stop()

    print(f"\nSmolLM2-135M Q4_1, {args.threads} onnxruntime thread(s) per board, {args.tokens} new tokens, greedy, "
          f"best of {args.rounds}\n")
    local = streams["local (beta's client)"]
    print(f"{'stream':<36}{'tokens':>7}{'TTFT ms':>10}{'decode tok/s':>14}{'x local':>9}"
          f"{'e2e tok/s':>11}{'x local':>9}")
    for name, r in streams.items():
        print(f"{name:<36}{r['tokens']:>7}{r['ttft_ms']:>10.1f}{r['decode_tps']:>14.1f}"
              f"{r['decode_tps'] / local['decode_tps']:>9.2f}{r['e2e_tps']:>11.1f}"
              f"{r['e2e_tps'] / local['e2e_tps']:>9.2f}")
    p50 = {"across": statistics.median(across) * 1000, "echo": statistics.median(echo) * 1000}
    p99 = {name: sorted(v)[int(len(v) * 0.99)] * 1000 for name, v in (("across", across), ("echo", echo))}
    print(f"\nsys.ping across boards (alpha TCP -> sys@beta), {args.pings} requests: p50 {p50['across']:.3f} ms, "
          f"p99 {p99['across']:.3f} ms")
    print(f"bare nats-py request-reply echo, same server:           p50 {p50['echo']:.3f} ms, p99 {p99['echo']:.3f} ms")
    print(f"ratio p50 {p50['across'] / p50['echo']:.2f}x")
    print(f"\n{args.streams} concurrent llm@* streams: over 1 board {one_board:.1f} tok/s, over 2 boards "
          f"{two_boards:.1f} tok/s ({used}): {two_boards / one_board:.2f}x")


if __name__ == "__main__":
    main()
