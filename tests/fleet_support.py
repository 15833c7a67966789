"""Fleet test helpers: a real nats-server on a loopback port, and `unitbus up` stacks (boards) that join it."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from support import Stack, StackFlowClient, free_port
from firmware_bridge.fleet.server import server_binary

TOKEN = "fleet-test-token"
MODEL = "smollm2-135m-instruct"
LLM_SETUP = {"model": MODEL, "response_format": "llm.utf-8.stream", "input": "llm.utf-8", "enoutput": True,
             "max_token_len": 24, "temperature": 0, "prompt": "You are a helpful assistant."}


class NatsServer:
    def __init__(self, tmp: Path, token: str = TOKEN):
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.log_path = tmp / "nats.log"
        self.proc = subprocess.Popen([server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "--auth", token,
                                      "-l", str(self.log_path)])
        deadline = time.monotonic() + 10
        while "Server is ready" not in (self.log_path.read_text() if self.log_path.exists() else ""):
            assert self.proc.poll() is None and time.monotonic() < deadline, "nats-server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        assert self.proc.wait(10) == 0


def board(tmp: Path, name: str, url: str, units=("llm",), token: str = TOKEN, env: dict | None = None,
          **settings) -> Stack:
    return Stack(tmp, list(units), {"fleet.url": url, "fleet.board": name, "fleet.token": token,
                                    "llm.max_tasks": "4", **settings}, env=env)


def wait_joined(stack: Stack, *boards: str, timeout: float = 30.0) -> None:
    """Until a fleet-wide sys.lsmode from `stack` hears from every one of `boards`."""
    deadline = time.monotonic() + timeout
    with StackFlowClient(stack.port, timeout=10) as c:
        while True:
            reply = c.request({"request_id": "j", "work_id": "sys", "action": "lsmode", "data": {"fleet": True}})
            if reply["error"]["code"] == 0 and set(boards) <= set(reply["data"]):
                return
            assert time.monotonic() < deadline, f"boards {boards} did not join: {reply}\n{stack.log()[-3000:]}"
            time.sleep(0.3)


def setup_llm(c: StackFlowClient, work_id: str, request_id: str = "setup", **extra) -> dict:
    return c.request({"request_id": request_id, "work_id": work_id, "action": "setup", "object": "llm.setup",
                      "data": {**LLM_SETUP, **extra}}, timeout=180)


def text_of(chunks: list[dict]) -> str:
    return "".join(m["data"]["delta"] for m in chunks)


async def fleet_stats(url: str, token: str = TOKEN, window_s: float = 0.5) -> dict[str, dict[str, dict]]:
    """$SRV.STATS.unitbus from every board, read with a bare nats-py client: {board: {subject: endpoint data}}."""
    import json

    import nats

    nc = await nats.connect(url, token=token)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish("$SRV.STATS.unitbus", b"", reply=inbox)
        out: dict[str, dict[str, dict]] = {}
        deadline = time.monotonic() + window_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except nats.errors.TimeoutError:
                break
            stats = json.loads(msg.data)
            out[stats["metadata"]["board"]] = {e["subject"]: e.get("data") or {} for e in stats["endpoints"]}
        return out
    finally:
        await nc.close()


def pid_of_module(stack: Stack, module: str) -> int:
    """pid of the child of `stack` running `python -m <module>`."""
    from support import alive, child_pids

    assert stack.proc is not None
    for pid in child_pids(stack.proc.pid):
        if module.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") and alive(pid):
            return pid
    raise LookupError(f"no running {module}")


class NatsCluster:
    """Three nats-servers routed into one cluster on loopback ports, each with its monitoring port, and
    (with `leaf_password`) a port accepting leaf nodes that present it."""

    def __init__(self, tmp: Path, token: str = TOKEN, size: int = 3, leaf_password: str = ""):
        self.ports = [free_port() for _ in range(size)]
        self.routes = [free_port() for _ in range(size)]
        self.monitors = [free_port() for _ in range(size)]
        self.leaf_ports = [free_port() for _ in range(size)] if leaf_password else []
        self.leaf_url = ",".join(f"nats-leaf://127.0.0.1:{p}" for p in self.leaf_ports)
        self.url = ",".join(f"nats://127.0.0.1:{p}" for p in self.ports)
        self.procs: list[subprocess.Popen] = []
        routes = ",".join(f"nats://127.0.0.1:{r}" for r in self.routes)
        for n in range(size):
            log = tmp / f"nats{n}.log"
            conf: list[str] = []
            if leaf_password:  # nats-server has no command-line flags for leaf nodes
                (tmp / f"nats{n}.conf").write_text(json.dumps({"leafnodes": {
                    "listen": f"127.0.0.1:{self.leaf_ports[n]}",
                    "authorization": {"user": "unitbus", "password": leaf_password}}}))
                conf = ["-c", str(tmp / f"nats{n}.conf")]
            self.procs.append(subprocess.Popen([
                server_binary(), *conf, "-a", "127.0.0.1", "-p", str(self.ports[n]), "--auth", token, "-m",
                str(self.monitors[n]), "--name", f"n{n}", "--cluster_name", "fleet", "--cluster",
                f"nats://127.0.0.1:{self.routes[n]}", "--routes", routes, "-l", str(log)]))
        deadline = time.monotonic() + 20
        while not all(self.routed(n) for n in range(size)):
            assert time.monotonic() < deadline, "the NATS cluster did not form"
            time.sleep(0.1)

    def _get(self, n: int, path: str) -> dict:
        import httpx

        return httpx.get(f"http://127.0.0.1:{self.monitors[n]}{path}", timeout=2).json()

    def routed(self, n: int) -> bool:
        try:
            return self._get(n, "/routez")["num_routes"] >= len(self.procs) - 1
        except Exception:  # not listening yet
            return False

    def leaf_nodes(self) -> list[str]:
        """The names of the leaf node servers connected to the cluster."""
        return sorted(leaf.get("name", "") for n, proc in enumerate(self.procs) if proc.poll() is None
                      for leaf in self._get(n, "/leafz").get("leafs", []))

    def server_of(self, client_name: str) -> int:
        """The server a client (by connection name) is connected to."""
        for n, proc in enumerate(self.procs):
            if proc.poll() is None and any(c.get("name") == client_name for c in self._get(n, "/connz")["connections"]):
                return n
        raise LookupError(client_name)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            proc.wait(10)
