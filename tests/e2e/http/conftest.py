"""One real stack (sys, llm unit with SmolLM2, the HTTP gateways) shared by every e2e HTTP test module."""
from __future__ import annotations

import json
import time

import httpx
import pytest

from support import Stack, free_port

APIS = ("openai", "ollama", "ai00", "cortex")
MODEL = "smollm2-135m-instruct"
BROKEN = {"mode": "broken-llm", "type": "llm", "capabilities": ["text_generation"], "input_type": ["llm.utf-8"],
          "output_type": ["llm.utf-8.stream"], "mode_param": {"gguf": "/nonexistent/broken.gguf"}}
APP_KEYS = [{"app_id": "admin", "app_secret": "s3cret-admin"}]


class HttpStack:
    def __init__(self, stack: Stack, ports: dict[str, int]):
        self.stack = stack
        self.ports = ports

    def url(self, api: str, path: str = "") -> str:
        return f"http://127.0.0.1:{self.ports[api]}{path}"

    def log(self) -> str:
        return self.stack.log()


@pytest.fixture(scope="session")
def http_stack(tmp_path_factory):
    ports = {api: free_port() for api in APIS}
    manifests = tmp_path_factory.mktemp("manifests")
    # A model whose files are missing: its load fails with -5, which the gateways answer with 500.
    (manifests / "mode_broken-llm.json").write_text(json.dumps(BROKEN))
    settings = {"up.http": "true", "models.manifest_dir": str(manifests), "http.ai00.model": MODEL,
                "http.ai00.embed_model": MODEL,
                "http.max_queue": "1", "http.allow_model_management": "true",
                "http.ai00.app_keys": json.dumps(APP_KEYS), "http.ai00.secret": "test-secret",
                "http.header_timeout_s": "2", "http.body_timeout_s": "2", "http.ai00.max_state_streams": "2",
                **{f"http.{api}.port": str(port) for api, port in ports.items()}}
    stack = Stack(tmp_path_factory.mktemp("http"), ["llm"], settings).start()
    hs = HttpStack(stack, ports)
    deadline = time.monotonic() + 60
    while True:
        try:
            if all(httpx.get(hs.url(api, "/livez"), timeout=2).status_code == 200 for api in APIS):
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stack.stop(check=False)
            raise RuntimeError("gateways did not come up:\n" + stack.log()[-4000:])
        time.sleep(0.2)
    # Load the model once so every test measures requests, not the first load.
    r = httpx.post(hs.url("openai", "/v1/completions"), json={"model": MODEL, "prompt": "Hi", "max_tokens": 1},
                   timeout=180)
    assert r.status_code == 200, r.text
    yield hs
    stack.stop()
