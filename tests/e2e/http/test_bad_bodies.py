"""Hostile and careless bodies against the real gateway process: each is a 4xx in the API's own error shape,
never a 500 or plain text (issue 14 items 6 and 9); slow headers and piled-up state streams are bounded."""
from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from support import StackFlowClient

APIS = ("openai", "ollama", "ai00", "cortex")
MODEL = "smollm2-135m-instruct"

# Each API's generation route and a well-formed body for it.
CHAT = {
    "openai": ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}),
    "ollama": ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": False}),
    "ai00": ("/api/oai/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
    "cortex": ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}),
}
HUGE = 10**30


def sampling_key(api: str, key: str) -> tuple[str, ...]:
    """Where a sampling value goes in the API's body (Ollama puts them under `options`)."""
    if api == "ollama":
        return ("options", {"max_tokens": "num_predict"}.get(key, key))
    return (key,)


def with_value(api: str, key: str, value) -> dict:
    body = json.loads(json.dumps(CHAT[api][1]))
    path = sampling_key(api, key)
    target = body
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = value
    return body


def bad_bodies(api: str) -> list[tuple[str, bytes]]:
    good = CHAT[api][1]
    message = json.dumps(good["messages"][0])
    return [
        *[(f"{key} 10**30", json.dumps(with_value(api, key, HUGE)).encode()) for key in ("max_tokens", "top_k", "seed")],
        ("lone surrogate", json.dumps(good)[:-1].encode() + b',"messages":[{"role":"user","content":"\\ud800"}]}'),
        ("role {}", json.dumps({**good, "messages": [{"role": {}, "content": "Hi"}]}).encode()),
        ("100k [", b"[" * 100_000),
        ("5k nesting in content", json.dumps(good)[:-1].encode() + b',"messages":[{"role":"user","content":'
         + b"[" * 5000 + b"]" * 5000 + b"}]}"),
        ("temperature NaN", json.dumps(with_value(api, "temperature", float("nan"))).encode()),
        ("presence_penalty Infinity", json.dumps(with_value(api, "presence_penalty", float("inf"))).encode()),
        ("temperature 1e999", json.dumps(good)[:-1].encode() + b',"temperature":1e999}'),
        ("invalid UTF-8", b'{"model":"\xff\xfe"}'),
        ("not an object", b'"hello"'),
        ("message not an object", json.dumps({**good, "messages": [message]}).encode()),
    ]


def assert_api_error(api: str, r: httpx.Response, body_name: str = "") -> None:
    """A 4xx whose JSON body is the API's own error shape."""
    assert 400 <= r.status_code < 500, (body_name, r.status_code, r.text[:300])
    body = r.json()
    if api == "ollama":
        assert isinstance(body["error"], str) and body["error"]
    else:  # OpenAI's shape, which Ai00 and the OpenAI routes of Cortex answer too
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
        assert body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("api", APIS)
def test_bad_bodies_are_4xx_in_the_apis_shape(http_stack, api):
    path, _ = CHAT[api]
    for name, raw in bad_bodies(api):
        r = httpx.post(http_stack.url(api, path), content=raw, headers={"Content-Type": "application/json"},
                       timeout=30)
        assert_api_error(api, r, name)
    # The listener is still fine afterwards: a well-formed body is answered.
    r = httpx.post(http_stack.url(api, path), json=with_value(api, "max_tokens", 1), timeout=120)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("api", APIS)
def test_nan_infinity_and_out_of_domain_values_name_the_field(http_stack, api):
    # JSON itself has no NaN; a value outside the key's domain (core/sampling.py) names the key.
    for key, value in (("temperature", -1), ("top_p", 1.5), ("top_k", -1), ("seed", 2**64)):
        r = httpx.post(http_stack.url(api, CHAT[api][0]), json=with_value(api, key, value), timeout=30)
        assert_api_error(api, r)
        message = r.json()["error"] if api == "ollama" else r.json()["error"]["message"]
        assert key in message, message


@pytest.mark.parametrize("api", APIS)
def test_top_p_zero_is_accepted_at_the_gateway_and_by_the_unit(http_stack, api):
    body = with_value(api, "top_p", 0)
    body = {**body, **({"options": {**body["options"], "num_predict": 2}} if api == "ollama" else {"max_tokens": 2})}
    r = httpx.post(http_stack.url(api, CHAT[api][0]), json=body, timeout=120)
    assert r.status_code == 200, r.text


def test_llm_setup_over_tcp_refuses_non_finite_sampling(http_stack):
    with StackFlowClient(http_stack.stack.port) as client:
        for i, raw in enumerate((b'{"temperature":NaN}', b'{"repetition_penalty":Infinity}', b'{"top_p":1.5}')):
            data = raw[:-1] + b',"model":"' + MODEL.encode() + b'","response_format":"llm.utf-8","input":"llm.utf-8"}'
            client.send(b'{"request_id":"s%d","work_id":"llm","action":"setup","object":"llm.setup","data":%s}'
                        % (i, data))
            reply = client.read_for(f"s{i}", timeout=60)
            assert reply["error"]["code"] == -2, reply


def test_openapi_documents_and_one_model_list_per_listener(http_stack):
    for api in APIS:
        doc = httpx.get(http_stack.url(api, "/openapi.json"), timeout=10).json()
        assert doc["openapi"].startswith("3.") and doc["paths"]
        assert httpx.get(http_stack.url(api, "/docs"), timeout=10).status_code == 200
        for item in doc["paths"].values():
            for operation in item.values():
                assert "422" not in operation["responses"]  # validation failures are 400s
    openai_models = httpx.get(http_stack.url("openai", "/v1/models"), timeout=10).json()
    cortex_models = httpx.get(http_stack.url("cortex", "/v1/models"), timeout=10).json()
    assert openai_models["project"] and "project" not in cortex_models
    assert cortex_models["result"] == "OK" and cortex_models["data"][0]["engine"].startswith("unitbus-")


def test_half_sent_headers_are_closed(http_stack):
    """http.header_timeout_s is 2 in this stack: a connection whose headers never end is closed by the
    server (recv sees the end), one that sends nothing at all likewise."""
    for first in (b"GET /livez HTTP/1.1\r\nHost: x\r\n", b""):
        with socket.create_connection(("127.0.0.1", http_stack.ports["openai"]), timeout=60) as sock:
            sock.sendall(first)
            assert sock.recv(1024) == b""
    # A whole request on a fresh connection is still answered.
    assert httpx.get(http_stack.url("openai", "/livez"), timeout=10).status_code == 200


def test_trickled_body_is_answered_408(http_stack):
    """http.body_timeout_s is 2 in this stack: a body that stops arriving after its headers is answered
    408 in the API's error shape and the connection closed; its admission ticket is given back, so the
    next request (http.max_queue is 1) is served."""
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{\"model\":")
    with socket.create_connection(("127.0.0.1", http_stack.ports["openai"]), timeout=60) as sock:
        sock.sendall(head)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 408 Request Timeout", answer
    error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "request_timeout" and "(9 bytes arrived)" in error["message"]
    reply = httpx.post(http_stack.url("openai", "/v1/chat/completions"), timeout=60,
                       json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 404


def test_ai00_state_streams_are_bounded(http_stack):
    """http.ai00.max_state_streams is 2 in this stack: the third concurrent stream is a 429; once one is
    closed a new one opens."""
    url = http_stack.url("ai00", "/api/models/state")
    with httpx.Client(timeout=30) as one, httpx.Client(timeout=30) as two, httpx.Client(timeout=30) as three:
        with one.stream("GET", url) as a, two.stream("GET", url) as b:
            assert a.status_code == 200 and b.status_code == 200
            lines = a.iter_lines()  # kept: a dropped line iterator would close the stream
            assert next(lines).startswith("data: ")
            with three.stream("GET", url) as extra:
                assert extra.status_code == 429 and "Retry-After" in extra.headers
                assert json.loads(extra.read())["error"]["message"].startswith("too many model state streams")
        # The server notices the closed streams at their next tick; wait for a slot rather than a time.
        deadline = time.monotonic() + 30
        while True:
            with three.stream("GET", url) as again:
                if again.status_code == 200:
                    break
            assert time.monotonic() < deadline, "a state stream slot never came back"
            time.sleep(0.2)
