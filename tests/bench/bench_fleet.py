"""The fleet over NATS: what crossing boards costs, measured against the same thing without it, in one run.

- tok/s of a stream from a task on another board vs the same board's task asked locally (StackFlow TCP);
- sys.ping p50 across boards vs a bare nats-py request-reply echo between two processes on the same
  nats-server. The fair pairing is a nats-py client asking beta's service (`unitbus.board.beta`, what
  alpha's bridge sends) vs that echo: what the fleet adds over NATS. The full path (alpha's StackFlow
  TCP port -> alpha's bridge and sys -> NATS -> beta's bridge and sys, and back) is reported too, and
  so are the parts: beta's own bus hop (a bus client -> its sys) and a bare asyncio+pyzmq echo over ipc,
  the floor of that hop, from which the floor of the service ping follows (echo + that hop);
- 8 load-balanced streams (`llm@*`) over 2 boards vs over 1, aggregate tok/s.
Every engine runs on --threads onnxruntime threads (1: this 2-core machine then has a core per board).
Prints a table with the load average at each figure (the machine is shared); asserts nothing.

    python tests/bench/bench_fleet.py [--tokens 64] [--rounds 3] [--pings 500] [--threads 1] [--only ping]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
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
from support import StackFlowClient, child_pids  # noqa: E402

import msgpack  # noqa: E402

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

# The floor of the hop to sys: a bare asyncio + pyzmq ROUTER echo in another process, over ipc.
ZMQ_ECHO = r'''
import asyncio, sys, zmq, zmq.asyncio
async def main():
    sock = zmq.asyncio.Context().socket(zmq.ROUTER)
    sock.bind(sys.argv[1])
    print("ready", flush=True)
    while True:
        await sock.send_multipart(await sock.recv_multipart())
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


def load() -> str:
    return "load " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def bus_ping(stack, count: int) -> list[float]:
    """sys.ping from a bus client inside the board: the hop to sys that beta's bridge adds to the echo."""
    from core import rundir
    from core.client import BusClient
    from core.envelope import Request

    async def run() -> list[float]:
        client = await BusClient(stack.endpoint, "bench", key=rundir.key(stack.run_dir)).start()
        out = []
        for n in range(count + 20):
            started = time.perf_counter()
            await client.request(Request("p", "sys", "ping"))
            if n >= 20:
                out.append(time.perf_counter() - started)
        await client.close()
        return out

    return asyncio.run(run())


def service_ping(url: str, count: int) -> list[float]:
    """sys.ping to beta's service from a bare nats-py client, as alpha's bridge asks it: until the final answer.
    The answers come through a subscription callback that resolves a future, as they do in nats-py's
    request() that the echo uses (sub.next_msg would add two tasks per answer that the echo does not pay)."""
    import nats

    async def run() -> list[float]:
        nc = await nats.connect(url, token=TOKEN)
        inbox = nc.new_inbox()
        arrived: collections.deque = collections.deque()
        waiting: list[asyncio.Future] = []

        async def answered(msg) -> None:
            arrived.append(msg)
            if waiting and not waiting[0].done():
                waiting[0].set_result(None)

        await nc.subscribe(inbox + ".*", cb=answered)
        body = msgpack.packb({"request": {"request_id": "p", "work_id": "sys", "action": "ping"}})
        loop = asyncio.get_running_loop()
        out = []
        for n in range(count + 20):
            call = f"{inbox}.{n}"
            started = time.perf_counter()
            await nc.publish("unitbus.board.beta", body, reply=call,
                             headers={"Unitbus-Origin": "bench/00/1", "Unitbus-Call": call})
            while True:
                if not arrived:
                    waiting[:] = [loop.create_future()]
                    await asyncio.wait_for(waiting[0], 5)
                answer = msgpack.unpackb(arrived.popleft().data)
                if answer.get("final"):
                    break
            if n >= 20:
                out.append(time.perf_counter() - started)
            assert answer.get("response", {}).get("error", {}).get("code", 0) == 0, answer
        await nc.close()
        return out

    return asyncio.run(run())


def zmq_echo(tmp: Path, count: int) -> list[float]:
    """A bare asyncio + pyzmq request-reply echo between two processes over ipc: what a bus hop costs
    with nothing of unitbus in it (no envelope, no routing)."""
    import zmq
    import zmq.asyncio

    endpoint = f"ipc://{tmp / 'zmq-echo.sock'}"
    responder = subprocess.Popen([sys.executable, "-c", ZMQ_ECHO, endpoint], stdout=subprocess.PIPE, text=True)
    try:
        assert responder.stdout is not None and responder.stdout.readline().strip() == "ready"

        async def run() -> list[float]:
            ctx = zmq.asyncio.Context()
            sock = ctx.socket(zmq.DEALER)
            sock.connect(endpoint)
            body = msgpack.packb({"request": {"request_id": "p", "work_id": "sys", "action": "ping"}})
            out = []
            for n in range(count + 20):
                started = time.perf_counter()
                await sock.send(body)
                await sock.recv()
                if n >= 20:
                    out.append(time.perf_counter() - started)
            ctx.destroy(linger=0)
            return out

        return asyncio.run(run())
    finally:
        responder.terminate()
        responder.wait()


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


def cpu_seconds(stacks, server) -> dict[str, float]:
    """CPU time used so far by the boards' llm units, by the rest of their processes (sys, bridges, the
    other units) and by nats-server: what the fleet costs beside the engines, whatever the machine's load."""
    out = {"llm units": 0.0, "sys, bridges, other units": 0.0, "nats-server": 0.0}
    tick = os.sysconf("SC_CLK_TCK")

    def used(pid: int) -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / tick

    for stack in stacks:
        for pid in [stack.proc.pid, *child_pids(stack.proc.pid)]:
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            out["llm units" if b"units.llm" in argv else "sys, bridges, other units"] += used(pid)
    out["nats-server"] = used(server.proc.pid)
    return out


def balanced(alpha, streams: int, tokens: int, bias: dict, boards_expected: int,
             cpu) -> tuple[float, dict[str, int], dict[str, float]]:
    """Aggregate tok/s of `streams` concurrent llm@* streams sent from alpha; which boards ran them; the
    CPU ms per token of each kind of process (cpu_seconds)."""
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
        before = cpu()
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
    after = cpu()
    return total / elapsed, boards, {k: (after[k] - before[k]) * 1000 / total for k in after}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pings", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads of each board's engine")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--only", choices=("all", "ping", "stream", "balance"), default="all")
    parser.add_argument("--balance-rounds", type=int, default=3,
                        help="1-board and 2-board runs alternate this many times (the shared machine's load moves)")
    args = parser.parse_args()
    wanted = {"all": {"ping", "stream", "balance"}}.get(args.only, {args.only})

    engine, bias = load_engine(1)
    del engine
    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    server = NatsServer(tmp)
    env = {"UNITBUS_THREADS": str(args.threads)}
    alpha = board(tmp / "alpha", "alpha", server.url, env=env).start(timeout=300)
    beta = None
    loads: dict[str, str] = {}
    rounds: list[tuple] = []
    try:
        wait_joined(alpha, "alpha")
        for n in range(args.balance_rounds if "balance" in wanted else 0):
            one_board, _, one_cpu = balanced(alpha, args.streams, args.tokens, bias, 1,
                                             lambda: cpu_seconds([alpha], server))
            one_load = load()
            beta = board(tmp / f"beta{n}", "beta", server.url, env=env).start(timeout=300)
            wait_joined(alpha, "alpha", "beta")
            two_boards, used, two_cpu = balanced(alpha, args.streams, args.tokens, bias, 2,
                                                 lambda stacks=[alpha, beta]: cpu_seconds(stacks, server))
            rounds.append((one_board, one_load, two_boards, load(), used, one_cpu, two_cpu))
            if n < args.balance_rounds - 1:
                beta.stop(check=False)
                beta = None
        if beta is None:
            beta = board(tmp / "beta", "beta", server.url, env=env).start(timeout=300)
        wait_joined(alpha, "alpha", "beta")
        if "stream" in wanted:
            streams = remote_vs_local(alpha, beta, args.tokens, args.rounds, bias)
            loads["stream"] = load()
        if "ping" in wanted:
            # Interleaved in rounds so that the machine's load falls on each alike.
            across, service, echo, hop, zmq_hop = [], [], [], [], []
            for _ in range(5):
                across += ping_across(alpha, args.pings // 5)
                service += service_ping(server.url, args.pings // 5)
                echo += bare_echo(server.url, args.pings // 5)
                hop += bus_ping(beta, args.pings // 5)
                zmq_hop += zmq_echo(tmp, args.pings // 5)
            loads["ping"] = load()
    finally:
        if beta is not None:
            beta.stop(check=False)
        alpha.stop(check=False)
        server.stop()

    print(f"\nSmolLM2-135M Q4_1, {args.threads} onnxruntime thread(s) per board, {args.tokens} new tokens, greedy, "
          f"best of {args.rounds}\n")
    if "stream" in wanted:
        local = streams["local (beta's client)"]
        print(f"{'stream':<36}{'tokens':>7}{'TTFT ms':>10}{'decode tok/s':>14}{'x local':>9}"
              f"{'e2e tok/s':>11}{'x local':>9}   ({loads['stream']})")
        for name, r in streams.items():
            print(f"{name:<36}{r['tokens']:>7}{r['ttft_ms']:>10.1f}{r['decode_tps']:>14.1f}"
                  f"{r['decode_tps'] / local['decode_tps']:>9.2f}{r['e2e_tps']:>11.1f}"
                  f"{r['e2e_tps'] / local['e2e_tps']:>9.2f}")
    if "ping" in wanted:
        print(f"\nsys.ping, {len(echo)} requests each, interleaved ({loads['ping']})")
        echo_p50 = statistics.median(echo) * 1000
        for name, values in (("bare nats-py request-reply echo, same server", echo),
                             ("nats-py client -> beta's service (sys of beta)", service),
                             ("alpha's TCP client -> sys@beta (full path)", across),
                             ("(a bus client inside beta -> its sys: no NATS)", hop),
                             ("(bare asyncio+pyzmq echo over ipc: no unitbus)", zmq_hop)):
            p50, p99 = statistics.median(values) * 1000, sorted(values)[int(len(values) * 0.99)] * 1000
            print(f"{name:<48} p50 {p50:7.3f} ms  p99 {p99:7.3f} ms  {p50 / echo_p50:5.2f}x echo")
        floor = (echo_p50 + statistics.median(zmq_hop) * 1000) / echo_p50
        print(f"floor of the service ping while beta's sys answers over ZeroMQ (echo + bare zmq echo): {floor:.2f}x")
    if rounds:
        print(f"\n{args.streams} concurrent llm@* streams, aggregate tok/s, 1 and 2 boards alternating:")
        for one_board, one_load, two_boards, two_load, used, one_cpu, two_cpu in rounds:
            print(f"  over 1 board {one_board:6.1f} ({one_load})   over 2 boards {two_boards:6.1f} ({used}, {two_load})"
                  f"   {two_boards / one_board:.2f}x")
            for name, cpu in (("1 board", one_cpu), ("2 boards", two_cpu)):
                print(f"    CPU ms per token, {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()))
        one = statistics.median(r[0] for r in rounds)
        two = statistics.median(r[2] for r in rounds)
        print(f"  median: {one:.1f} vs {two:.1f} tok/s: {two / one:.2f}x")


if __name__ == "__main__":
    main()
