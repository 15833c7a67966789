"""Ai00 and Jan/Cortex listeners against a real stack, with raw HTTP (http-apis.md §4, §5)."""
from __future__ import annotations

import json

import httpx
import pytest

from support import StackFlowClient

pytestmark = pytest.mark.e2e
MODEL = "smollm2-135m-instruct"
WATER = {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Tell me about water."}], "max_tokens": 8}


def test_ai00_chat_shape(http_stack):
    r = httpx.post(http_stack.url("ai00", "/api/oai/chat/completions"), json=WATER, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    message = choice["message"]
    assert message["role"] == "Assistant" and message["content"] == message["content"].strip()
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total"] == usage["prompt"] + usage["completion"] and usage["completion"] <= 8
    assert set(usage["duration"]) == {"secs", "nanos"}
    assert body["model"] == MODEL


def test_ai00_stream_and_sampler(http_stack):
    body = {**WATER, "stream": True, "sampler": {"type": "Nucleus", "top_p": 0.5, "penalty": 400}}
    with httpx.stream("POST", http_stack.url("ai00", "/api/oai/v1/chat/completions"), json=body, timeout=60) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "Assistant"}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"]
    contents = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
    assert contents and contents[0] == contents[0].lstrip()
    bad = httpx.post(http_stack.url("ai00", "/api/oai/chat/completions"),
                     json={**WATER, "sampler": {"type": "nucleus"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "sampler.type"


def test_ai00_completions_and_chooses(http_stack):
    r = httpx.post(http_stack.url("ai00", "/api/oai/completions"),
                   json={"prompt": ["The capital of France", " is"], "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["object"] == "text_completion"
    r = httpx.post(http_stack.url("ai00", "/api/oai/chooses"), timeout=60,
                   json={"input": "The capital of France is", "choices": [" banana", " Paris", " the"]})
    data = r.json()["data"]
    assert [d["rank"] for d in data] == [0, 1, 2]
    assert [d["perplexity"] for d in data] == sorted(d["perplexity"] for d in data)
    assert data[0]["choice"] != " banana" and {d["index"] for d in data} == {0, 1, 2}
    r = httpx.post(http_stack.url("ai00", "/api/oai/chat/completions"), json={**WATER, "state": "abc"})
    assert r.status_code == 404


def test_ai00_embeddings_embeds_and_grammar(http_stack):
    url = http_stack.url("ai00", "/api/oai")
    states = httpx.post(url + "/states", json={"input": ["a cat", "a dog"], "embed_layer": -2}, timeout=60).json()
    vectors = [d["embedding"] for d in states["data"]]
    assert len(vectors) == 2 and len(vectors[0]) > 100 and vectors[0] != vectors[1]
    text = " ".join(f"word{i}" for i in range(25))
    embeds = httpx.post(url + "/embeds", json={"input": text, "max_tokens": 10}, timeout=60).json()
    chunks = embeds["data"][0]["chunks"]
    assert embeds["object"] == "embeds" and [len(c["chunk"].split()) for c in chunks] == [10, 10, 5]
    assert all(len(c["embed"]) == 1 and len(c["embed"][0]) == len(vectors[0]) for c in chunks)
    assert httpx.post(url + "/embeds", json={"input": "  "}).status_code == 400
    r = httpx.post(url + "/chat/completions", json={**WATER, "bnf_schema": "start ::= json_object;"})
    assert r.status_code == 400 and "json_object" in r.json()["error"]["message"]  # undefined in the grammar


def test_ai00_info_routes(http_stack):
    assert httpx.get(http_stack.url("ai00", "/api/oai/models")).json() == {"data": [{"object": "models", "id": MODEL}]}
    adapters = httpx.get(http_stack.url("ai00", "/api/adapters")).json()
    assert "CPU (onnxruntime CPUExecutionProvider)" in adapters
    assert MODEL in httpx.get(http_stack.url("ai00", "/api/models/list")).json()
    info = httpx.get(http_stack.url("ai00", "/api/models/info")).json()
    assert info["model"]["id"] == MODEL and info["states"] == []


def test_ai00_token_exchange_and_admin(http_stack):
    url = http_stack.url("ai00")
    denied = httpx.post(url + "/api/auth/exchange", json={"app_id": "admin", "app_secret": "wrong"})
    assert denied.status_code == 403 and denied.json() == {"token": None, "code": 403,
                                                           "message": "NO-Match AppId and SecretKey"}
    assert httpx.get(url + "/admin/models/unload").status_code == 401
    token = httpx.post(url + "/api/auth/exchange", json={"app_id": "admin", "app_secret": "s3cret-admin"}).json()
    assert token["code"] == 200 and token["message"] == "SUCCESS"
    assert httpx.get(url + "/admin/models/unload", params={"admin_token": token["token"] + "x"}).status_code == 401
    headers = {"Authorization": f"Bearer {token['token']}"}
    assert httpx.get(url + "/admin/models/unload", headers=headers).status_code == 200
    assert httpx.get(url + "/api/models/info").json()["model"]["state"] == "available"
    r = httpx.post(url + "/admin/models/load", headers=headers, timeout=180,
                   json={"model_path": f"models/mode_{MODEL}.json", "max_batch": 2})
    assert r.status_code == 200, r.text
    info = httpx.get(url + "/api/models/info").json()
    assert info["model"]["state"] == "loaded" and info["reload"]["max_batch"] == 2
    assert httpx.post(url + "/admin/models/load", headers=headers, json={"model_path": "../nope.st"}).status_code == 404
    assert httpx.post(url + "/admin/models/save", headers=headers, json={"path": "x"}).status_code == 501


def test_cortex_models_start_status_stop(http_stack):
    url = http_stack.url("cortex")
    listing = httpx.get(url + "/v1/models").json()
    assert listing["object"] == "list" and listing["result"] == "OK"
    item = next(m for m in listing["data"] if m["id"] == MODEL)
    assert item["state"] in ("ready", "starting") and item["status"] == "downloaded"
    assert item["settings"]["ctx_len"] == 8192 and item["settings"]["embedding"] is True
    r = httpx.put(url + f"/v1/models/{MODEL}/start", timeout=180)
    assert r.json() == {"id": MODEL, "object": "model", "state": "running"}
    assert httpx.get(url + f"/v1/models/{MODEL}").json()["state"] == "running"
    assert httpx.get(url + f"/v1/models/status/{MODEL}").json() == {"message": "Model is running"}
    assert httpx.post(url + "/v1/models/stop", json={"model": MODEL}).json() == {"message": "Stopped successfully!"}
    status = httpx.get(url + f"/v1/models/status/{MODEL}")
    assert status.status_code == 400 and status.json() == {"message": "Model has not been loaded"}
    assert httpx.get(url + f"/v1/models/{MODEL}").json()["state"] == "downloaded"
    missing = httpx.get(url + "/v1/models/nope")
    assert missing.status_code == 404 and missing.json() == {"message": "Model not found", "error": "Model not found"}
    r = httpx.post(url + "/v1/models/start", json={"model": MODEL, "settings": {"prompt_template": "{prompt}"}})
    assert r.status_code == 400
    r = httpx.post(url + "/v1/models/start", json={"model": MODEL, "ctx_len": "2048"}, timeout=180)
    assert r.json() == {"message": "Started successfully!"}
    r = httpx.post(url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    assert httpx.put(url + f"/v1/models/{MODEL}/stop").json() == {"id": MODEL, "object": "model", "state": "stopped"}


def test_tasks_of_tcp_clients_are_reported_never_taken(http_stack):
    with StackFlowClient(http_stack.stack.port) as tcp:
        reply = tcp.request({"request_id": "s", "work_id": "llm", "action": "setup", "object": "llm.setup",
                             "data": {"model": "qwen2.5-0.5b", "response_format": "llm.utf-8.stream",
                                      "input": "llm.utf-8", "enoutput": True}}, timeout=120)
        assert reply["error"]["code"] == 0, reply
        work_id = reply["work_id"]
        try:
            ps = httpx.get(http_stack.url("ollama", "/api/ps")).json()["models"]
            assert {"model": f"{MODEL}:latest", "expires_at": "9999-12-31T23:59:59Z"} in [
                {k: m[k] for k in ("model", "expires_at")} for m in ps]
            r = httpx.put(http_stack.url("cortex", f"/v1/models/{MODEL}/stop"))
            assert r.status_code == 409 and r.json()["message"] == f"Model in use by {work_id}"
            # The gateway loads a task of its own rather than using the TCP client's.
            r = httpx.post(http_stack.url("openai", "/v1/completions"), timeout=120,
                           json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 200
            owned = [t for t in tcp.request({"request_id": "l", "work_id": "sys", "action": "lstask"})["data"]
                     if t["work_id"].startswith("llm.")]
            assert len(owned) == 2 and work_id in [t["work_id"] for t in owned]
        finally:
            assert tcp.request({"request_id": "x", "work_id": work_id, "action": "exit"})["error"]["code"] == 0
