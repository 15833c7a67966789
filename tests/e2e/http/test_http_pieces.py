"""Gateway pieces without a stack: request mapping, error mapping, framing, auth, DecentralGPT registration."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient

from core.settings import Settings
from firmware_bridge.http import ai00, auth, dbc, ollama, openai
from firmware_bridge.http.app import create_app
from firmware_bridge.http.errors import GatewayError
from firmware_bridge.http.gateway import Gateway, parse_duration
from firmware_bridge.http.streaming import UnitStream, ndjson, sse

MANIFEST = {"mode": "m", "type": "llm", "capabilities": ["text_generation", "logit_bias"],
            "mode_param": {"max_token_len": 77}}


def settings(**values) -> Settings:
    return Settings.load(overrides={k.replace("__", "."): v for k, v in values.items()}, environ={})


@pytest.mark.parametrize("value, seconds", [("5m", 300.0), ("1h30m", 5400.0), ("10s", 10.0), ("300ms", 0.3),
                                            (0, 0.0), ("120", 120.0), (-1, None), ("-5m", None)])
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["5 minutes", "m5", True, ""])
def test_parse_duration_rejects(value):
    with pytest.raises(ValueError):
        parse_duration(value)


def test_error_mapping_and_headers():
    busy = GatewayError.from_unit(-32, "inference queue full", retry_after=200)
    assert busy.status == 503 and busy.code == "server_busy"
    assert busy.headers() == {"Retry-After": "60", "retry-after-ms": "60000"}
    ctx = GatewayError.from_unit(-35, "prompt is 9000 tokens")
    assert ctx.status == 400 and ctx.code == "context_length_exceeded" and ctx.dbc_code() == 2035
    assert ctx.headers() == {"x-should-retry": "false"}
    assert GatewayError.from_unit(-11, "").status == 500 and GatewayError.from_unit(-33, "").status == 504
    assert GatewayError(404, "x").openai_body()["code"] == 2101
    assert GatewayError(400, "x", param="n").openai_body(False) == {
        "error": {"message": "x", "type": "invalid_request_error", "param": "n", "code": "invalid_request"}}


def test_openai_chat_mapping():
    body = {"messages": [{"role": "developer", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "max_completion_tokens": 9, "max_tokens": 3, "stop": "END", "temperature": 0, "tool_choice": "none",
            "logit_bias": {"42": -100}, "user": "ignored"}
    data = openai.chat_data(body, MANIFEST)
    assert data["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "ab"}]
    assert data["max_tokens"] == 9 and data["stop"] == ["END"] and data["temperature"] == 0
    assert data["logit_bias"] == {"42": -100.0}
    assert openai.chat_data({"messages": [{"role": "user", "content": "x"}]}, MANIFEST)["max_tokens"] == 77
    assert openai.completion_data({"prompt": ["x"]}, MANIFEST) == {"prompt": "x", "raw": True, "max_tokens": 16}


@pytest.mark.parametrize("extra, param", [
    ({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"tools": [{"type": "function"}]}, "tools"),
    ({"temperature": 3}, "temperature"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"), ({"messages": []}, "messages")])
def test_openai_chat_rejections(extra, param):
    with pytest.raises(GatewayError) as info:
        openai.chat_data({"messages": [{"role": "user", "content": "x"}], **extra}, MANIFEST)
    assert info.value.status == 400 and info.value.param == param


def test_ollama_options_and_names():
    data = ollama.options({"options": {"num_predict": 12, "repeat_penalty": 1.2, "repeat_last_n": 32, "stop": ["x"],
                                       "mirostat": 2, "mirostat_tau": 4.0, "num_gpu": 1, "whatever": 1}})
    assert data == {"max_tokens": 12, "repetition_penalty": 1.2, "penalty_window": 32, "stop": ["x"],
                    "sampler": {"type": "Mirostat", "tau": 4.0, "rate": 0.1}}
    assert "max_tokens" not in ollama.options({"options": {"num_predict": -1}})
    with pytest.raises(GatewayError):
        ollama.options({"options": {"temperature": "hot"}})
    assert ollama.split_name("smollm2:latest") == ("smollm2", "latest")
    assert ollama.split_name("smollm2") == ("smollm2", "latest")
    assert ollama.split_name("host:5000/ns/model") == ("host:5000/ns/model", "latest")
    assert ollama.rfc3339(0) == "1970-01-01T00:00:00.000000Z"


def test_ai00_prompt_layout():
    prompt = ai00.build_prompt([{"role": "user", "content": "Hi!"}, {"role": "Assistant", "content": "Hello!"},
                                {"role": "user", "content": "  Tell me\n\n\nabout water.  "}])
    assert prompt == "User: Hi!\n\nAssistant: Hello!\n\nUser: Tell me\nabout water.\n\nAssistant:"
    named = ai00.build_prompt([{"role": "user", "content": "x"}], names={"user": "Bob", "assistant": "Ann"},
                              template={"sep": "\n"})
    assert named == "Bob: x\nAnn:"


def test_ai00_sampler_parsing():
    nucleus = ai00.parse_sampler({"type": "Nucleus", "TOP_P": 0.9, "penalty": 200})
    assert nucleus["top_p"] == 0.9 and nucleus["top_k"] == 128
    assert nucleus["penalty_decay"] == pytest.approx(0.99654026, abs=1e-7)  # Ai00's default is a 200-token half-life
    mirostat = ai00.parse_sampler({"type": "Mirostat", "learning_rate": 0.2})
    assert mirostat == {"type": "Mirostat", "tau": 3.0, "rate": 0.2}
    for bad in ({"type": "nucleus"}, {"type": "Typical", "tau": "x"}, {"type": "Nucleus", "penalty": 0}):
        with pytest.raises(GatewayError):
            ai00.parse_sampler(bad)


def test_jwt_roundtrip_tamper_and_expiry():
    token = auth.issue("admin", "k", 60)
    assert auth.decode(token, "k")["sid"] == "admin"
    with pytest.raises(auth.TokenError):
        auth.decode(token, "other")
    header, payload, sig = token.split(".")
    with pytest.raises(auth.TokenError):
        auth.decode(f"{header}.{auth._b64(json.dumps({'sid': 'root', 'exp': 2**40}).encode())}.{sig}", "k")
    with pytest.raises(auth.TokenError):
        auth.decode(token, "k", now=time.time() + 120)
    # Interoperable with standard HS256 verifiers: the signature is over "header.payload".
    import base64
    import hashlib
    import hmac
    expected = hmac.new(b"k", f"{header}.{payload}".encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)) == expected


def test_framing():
    assert sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    line = ndjson({"response": "a\nb"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1


def test_unit_stream_close_reaches_the_source():
    events = []

    async def source():
        try:
            yield 1
            await asyncio.sleep(30)
            yield 2
        finally:
            events.append("closed")

    async def scenario():
        tasks = []
        stream = UnitStream(source(), lambda coro: tasks.append(asyncio.ensure_future(coro)))
        assert await stream.next(1) == 1
        with pytest.raises(asyncio.TimeoutError):
            await stream.next(0.05)
        stream.close()
        await asyncio.sleep(0.05)
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())
    assert events == ["closed"]


# apps without a bus: what is decided before anything reaches sys ---------------------------------
def app_client(api: str, **values) -> TestClient:
    return TestClient(create_app(api, Gateway(settings(**values))))


def test_api_key_guard_and_open_paths():
    client = app_client("openai", http__api_key="sekrit")
    r = client.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["x-should-retry"] == "false"
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/livez").json() == {"status": "alive"}
    ollama_client = app_client("ollama", http__api_key="sekrit")
    assert ollama_client.get("/api/tags").json() == {"error": "Incorrect API key provided"}


def test_body_limit_and_unknown_route():
    client = app_client("openai", http__max_body_bytes="100")
    r = client.post("/v1/chat/completions", content=b"x" * 200)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_management_routes_closed_by_default():
    pull = app_client("ollama").post("/api/pull", json={"model": "x"})
    assert pull.status_code == 403 and pull.json() == {"error": "model management is disabled"}
    assert app_client("ollama").request("DELETE", "/api/delete", json={"model": "x"}).status_code == 403
    assert app_client("cortex").delete("/v1/models/x").status_code == 403
    assert app_client("ai00").get("/admin/models/unload").status_code == 403
    no_keys = app_client("ai00", http__allow_model_management="true").get("/admin/models/unload")
    assert no_keys.status_code == 403 and no_keys.json()["error"]["message"] == "no admin credentials configured"


def test_per_ip_limit_is_429():
    gw = Gateway(settings(http__max_inflight_per_ip="1"))
    tickets = gw.admit(None, "10.0.0.1")
    with pytest.raises(GatewayError) as info:
        gw.admit(None, "10.0.0.1")
    assert info.value.status == 429 and "Retry-After" in info.value.headers()
    assert gw.admit(None, "10.0.0.2")
    gw.release(tickets)
    assert gw.admit(None, "10.0.0.1")


# DecentralGPT registration against a stub node on loopback ---------------------------------------
class StubNode(BaseHTTPRequestHandler):
    calls: list = []
    failures = 2

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StubNode.calls.append((self.path, body))
        if self.path.endswith("/project/register") and StubNode.failures > 0:
            StubNode.failures -= 1
            answer, status = {"code": 1001, "message": "not ready"}, 200
        else:
            answer, status = {"code": 0, "message": "ok"}, 200
        raw = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


def test_dbc_registration_retries_then_unregisters(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubNode)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(dbc, "BACKOFF_START_S", 0.05)
    states: list[str] = []

    async def models():
        return [{"mode": "smollm2-135m-instruct"}, {"mode": "other"}]

    cfg = settings(http__dbc__node=f"http://127.0.0.1:{server.server_port}",
                   http__dbc__models='["smollm2-135m-instruct"]', http__dbc__cid="3f9c2a71b0de")
    registrar = dbc.Registrar(cfg, models, "http://127.0.0.1:8000/v1/chat/completions", states.append)

    async def scenario():
        task = asyncio.create_task(registrar.run())
        while "registered" not in states:
            await asyncio.sleep(0.02)
        task.cancel()
        await registrar.unregister()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 20))
    finally:
        server.shutdown()
    registers = [b for p, b in StubNode.calls if p == "/api/v0/ai/project/register"]
    assert len(registers) == 3 and states[:3] == ["retrying", "retrying", "registered"]
    assert registers[-1] == {"project": "unitbus", "models": [{"model": "smollm2-135m-instruct",
                             "api": "http://127.0.0.1:8000/v1/chat/completions", "type": 0, "cid": "3f9c2a71b0de"}]}
    assert StubNode.calls[-1] == ("/api/v0/ai/project/unregister", {"project": "unitbus"})
    assert len(dbc.default_cid()) == 12


# stream bodies: errors after the headers went out ----------------------------------------------
def run_body(body_factory) -> list[bytes]:
    async def scenario():
        return [piece async for piece in body_factory()]
    return asyncio.run(scenario())


async def failing_source():
    yield {"delta": "Hel", "finish": False, "index": 0}
    raise GatewayError.from_unit(-11, "Model run failed.: boom")


def test_openai_midstream_error_is_a_data_line_without_done():
    def body():
        stream = UnitStream(failing_source(), asyncio.ensure_future)
        return openai.chat_events(stream, {"delta": "", "finish": False, "index": 0}, "chatcmpl-x", 1, "m", 15.0,
                                  False, False)
    pieces = run_body(body)
    events = [json.loads(p[6:]) for p in pieces]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[1]["choices"][0]["delta"] == {"content": "Hel"}
    assert events[-1] == {"error": {"message": "Model run failed.: boom", "type": "api_error", "param": None,
                                    "code": "model_error"}}
    assert b"[DONE]" not in b"".join(pieces)


def test_ollama_midstream_error_is_an_error_line():
    def body():
        stream = UnitStream(failing_source(), asyncio.ensure_future)
        return ollama.ndjson_events(stream, {"delta": "", "finish": False, "index": 0},
                                    lambda text, done, last=None: {"response": text, "done": done})
    pieces = run_body(body)
    assert [json.loads(p) for p in pieces] == [{"response": "Hel", "done": False},
                                              {"error": "Model run failed.: boom"}]
    assert all(p.endswith(b"\n") and p.strip() for p in pieces)


def test_sse_keepalive_comments_while_waiting():
    async def slow_source():
        await asyncio.sleep(0.35)
        yield {"delta": "Hi", "finish": False, "index": 0}
        yield {"delta": "", "finish": True, "index": 1, "finish_reason": "stop", "usage": {}}

    def body():
        from firmware_bridge.http.streaming import KEEPALIVE_DUE
        stream = UnitStream(slow_source(), asyncio.ensure_future)
        return openai.chat_events(stream, KEEPALIVE_DUE, "chatcmpl-x", 1, "m", 0.1, False, False)

    pieces = run_body(body)
    keepalives = [p for p in pieces if p == b": keep-alive\n\n"]
    assert len(keepalives) >= 3  # the first before anything else, then one per 0.1 s of waiting
    assert pieces[0] == b": keep-alive\n\n" and pieces[-1] == b"data: [DONE]\n\n"
    data = [json.loads(p[6:]) for p in pieces if p.startswith(b"data: {")]
    assert [d["choices"][0]["delta"] for d in data] == [{"role": "assistant", "content": ""}, {"content": "Hi"}, {}]


def test_ai00_admin_needs_the_api_key_beside_its_token():
    client = app_client("ai00", http__api_key="sekrit")
    assert client.get("/admin/models/unload", headers={"Authorization": "Bearer sekrit"}).status_code == 401
    # With the key in x-api-key the request reaches the admin check (management is off: 403).
    assert client.get("/admin/models/unload", headers={"x-api-key": "sekrit"}).status_code == 403


def test_each_route_is_defined_once_per_listener():
    """Route tables are per API; a listener that also serves another API's routes never gets a second
    definition of one (Cortex keeps its own /v1/models, Ollama takes OpenAI's)."""
    from firmware_bridge.http import cortex
    from firmware_bridge.http.app import APIS
    from firmware_bridge.http.common import HEALTH

    for api, module in APIS.items():
        routes = [route for router in (HEALTH, *module.ROUTERS) for route in router.routes]
        keys = [(method, route.path) for route in routes for method in route.methods]
        assert len(keys) == len(set(keys)), api
        models = [route.endpoint for route in routes if route.path == "/v1/models" and "GET" in route.methods]
        if api != "ai00":
            assert models == [cortex.list_models if api == "cortex" else openai.list_models], api
        assert create_app(api, Gateway(settings())).openapi()["paths"]
