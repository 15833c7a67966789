"""Preloaded models, readiness, opt-in history truncation and DecentralGPT registration
(http-apis.md §1.3, §1.9, §1.10, §2.10) on a stack of its own."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from support import free_port

pytestmark = pytest.mark.e2e
MODEL = "smollm2-135m-instruct"


class Node(BaseHTTPRequestHandler):
    """A stand-in for the AIComputingNode HTTP API: records calls, answers {"code":0}."""

    calls: list = []

    def do_POST(self):
        Node.calls.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
        raw = b'{"code":0,"message":"ok"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


def test_preload_health_truncation_and_registration(stack_factory):
    node = ThreadingHTTPServer(("127.0.0.1", 0), Node)
    threading.Thread(target=node.serve_forever, daemon=True).start()
    openai_port, ollama_port = free_port(), free_port()
    stack = stack_factory(["llm"], {"up.http": "true", "http.preload": f'["{MODEL}"]',
                                    "http.openai.port": str(openai_port), "http.ollama.port": str(ollama_port),
                                    "http.ai00.enabled": "false", "http.cortex.enabled": "false",
                                    "http.truncate_history": "oldest", "http.dbc.enabled": "true",
                                    "http.dbc.node": f"http://127.0.0.1:{node.server_port}"})
    seen = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"http://127.0.0.1:{openai_port}/health", timeout=5)
        except httpx.HTTPError:
            time.sleep(0.1)
            continue
        seen.append((r.status_code, r.json()["status"]))
        if r.status_code == 200:
            break
        time.sleep(0.1)
    assert seen and seen[-1] == (200, "ok"), (seen, stack.log()[-3000:])
    assert all(code == 503 and status in ("loading", "unavailable") for code, status in seen[:-1])
    assert httpx.get(f"http://127.0.0.1:{openai_port}/health").json()["models"] == {MODEL: "loaded"}
    # Nobody asked yet, but the model is resident and never expires (Ollama's ps says so).
    ps = httpx.get(f"http://127.0.0.1:{ollama_port}/api/ps").json()["models"]
    assert [(m["model"], m["expires_at"]) for m in ps] == [(f"{MODEL}:latest", "9999-12-31T23:59:59Z")]
    assert httpx.get(f"http://127.0.0.1:{openai_port}/livez").json() == {"status": "alive"}
    # http.truncate_history = "oldest": whole old messages go, the system prompt and the question stay.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "water " * 9000},
                {"role": "assistant", "content": "OK."}, {"role": "user", "content": "Say hi"}]
    r = httpx.post(f"http://127.0.0.1:{openai_port}/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": messages, "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.headers["x-unitbus-truncated-messages"] == "1"
    assert r.json()["usage"]["prompt_tokens"] < 100
    # Registered with the node at start; unregistered when the stack stops (SIGTERM).
    health = httpx.get(f"http://127.0.0.1:{openai_port}/health").json()
    assert health["dbc"] == "registered"
    path, body = Node.calls[0]
    assert path == "/api/v0/ai/project/register" and body["project"] == "unitbus"
    assert {m["model"] for m in body["models"]} == {MODEL}
    assert body["models"][0]["api"] == f"http://127.0.0.1:{openai_port}/v1/chat/completions"
    stack.stop()
    node.shutdown()
    assert Node.calls[-1] == ("/api/v0/ai/project/unregister", {"project": "unitbus"})
