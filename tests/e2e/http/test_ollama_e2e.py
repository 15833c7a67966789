"""Ollama listener against a real stack, driven by the real `ollama` client (http-apis.md §3, §6)."""
from __future__ import annotations

import datetime as dt
import time

import httpx
import ollama
import pytest

pytestmark = pytest.mark.e2e
MODEL = "smollm2-135m-instruct"
TAGGED = f"{MODEL}:latest"


@pytest.fixture(scope="module")
def client(http_stack):
    return ollama.Client(host=http_stack.url("ollama"), timeout=120)


def test_root_version_and_list(client, http_stack):
    assert httpx.get(http_stack.url("ollama", "/")).text == "Ollama is running"
    assert httpx.get(http_stack.url("ollama", "/api/version")).json()["version"]
    models = client.list().models
    entry = next(m for m in models if m.model == TAGGED)
    assert entry.size > 50_000_000 and len(entry.digest) == 64
    assert entry.details.family == "llama" and entry.details.quantization_level == "Q4_1"
    assert isinstance(entry.modified_at, dt.datetime)
    assert all(m.model != "whisper-tiny.en:latest" for m in models)  # only llm models


def test_show(client):
    shown = client.show(MODEL)
    assert shown.modelinfo["llama.context_length"] == 8192
    assert shown.modelinfo["general.parameter_count"] == 134515008
    assert "completion" in shown.capabilities and "temperature 0.7" in shown.parameters
    with pytest.raises(ollama.ResponseError) as info:
        client.show("nope")
    assert info.value.status_code == 404


def test_generate_non_stream_and_stream(client):
    result = client.generate(model=MODEL, prompt="Say hi", options={"num_predict": 6, "temperature": 0})
    assert result.done and result.done_reason in ("stop", "length") and result.response
    assert 0 < result.eval_count <= 6 and result.prompt_eval_count > 0
    assert result.total_duration > result.eval_duration > 0  # nanoseconds
    assert result.context and isinstance(result.context[0], int)
    chunks = list(client.generate(model=MODEL, prompt="Say hi", stream=True, options={"num_predict": 6}))
    assert all(c.model == TAGGED for c in chunks)
    assert not any(c.done for c in chunks[:-1]) and chunks[-1].done
    assert 0 < chunks[-1].eval_count <= 6 and chunks[-1].done_reason in ("stop", "length")
    assert "".join(c.response for c in chunks).strip()


def test_chat_stream_final_chunk_has_message(client, http_stack):
    chunks = list(client.chat(model=MODEL, messages=[{"role": "user", "content": "Hello"}], stream=True,
                              options={"num_predict": 5}))
    assert chunks[-1].done and chunks[-1].message.role == "assistant"
    assert "".join(c.message.content for c in chunks)
    with httpx.stream("POST", http_stack.url("ollama", "/api/chat"), timeout=60,
                      json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                            "options": {"num_predict": 4}}) as r:
        assert r.headers["content-type"] == "application/x-ndjson"
        raw = r.read()
    assert raw.endswith(b"\n") and b"\n\n" not in raw


def test_errors(client, http_stack):
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model=f"{MODEL}:q8", prompt="x")
    assert info.value.status_code == 404
    r = httpx.post(http_stack.url("ollama", "/api/generate"))
    assert r.status_code == 400 and r.json() == {"error": "missing request body"}
    r = httpx.post(http_stack.url("ollama", "/api/generate"),
                   json={"model": MODEL, "prompt": "x", "options": {"temperature": "hot"}})
    assert r.status_code == 400 and "temperature" in r.json()["error"]
    r = httpx.post(http_stack.url("ollama", "/api/generate"), json={"model": MODEL, "prompt": "x", "think": "much"})
    assert r.status_code == 400 and "think" in r.json()["error"]
    assert httpx.post(http_stack.url("ollama", "/api/copy"), json={}).status_code == 501


def test_load_unload_and_ps(client):
    loaded = client.generate(model=MODEL, prompt="", keep_alive="10m")
    assert loaded.done_reason == "load"
    running = client.ps().models
    entry = next(m for m in running if m.model == TAGGED)
    assert entry.expires_at > dt.datetime.now(dt.timezone.utc)
    unloaded = client.generate(model=MODEL, prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert all(m.model != TAGGED for m in client.ps().models)
    again = client.chat(model=MODEL, messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 2})
    assert again.message.content and again.load_duration > 0  # it had to load


def test_embed(client):
    result = client.embed(model=MODEL, input=["a cat", "a dog"])
    assert len(result.embeddings) == 2 and len(result.embeddings[0]) > 100
    legacy = client.embeddings(model=MODEL, prompt="a cat")
    assert legacy.embedding == pytest.approx(result.embeddings[0], abs=1e-5)


def test_keep_alive_expiry_unloads(client):
    client.generate(model=MODEL, prompt="Hi", keep_alive="1s", options={"num_predict": 2})
    assert any(m.model == TAGGED for m in client.ps().models)
    deadline = time.monotonic() + 6
    while any(m.model == TAGGED for m in client.ps().models):
        assert time.monotonic() < deadline, "still loaded after its keep_alive"
        time.sleep(0.2)
