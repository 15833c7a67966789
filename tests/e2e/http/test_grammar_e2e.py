"""Constrained decoding through the HTTP gateways: Ollama `format` ("json" and a JSON Schema) with the
real `ollama` client, OpenAI `response_format` with the real `openai` client, and Ai00 `bnf_schema`
(KBNF) with raw HTTP."""
from __future__ import annotations

import json
import re

import httpx
import ollama
import openai
import pytest

pytestmark = pytest.mark.e2e
MODEL = "smollm2-135m-instruct"
CITY = {"type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "population": {"type": "integer", "minimum": 0},
                       "capital": {"type": "boolean"}},
        "required": ["city", "population", "capital"], "additionalProperties": False}


@pytest.fixture(scope="module")
def client(http_stack):
    return ollama.Client(host=http_stack.url("ollama"), timeout=120)


def test_ollama_chat_format_json(client):
    reply = client.chat(model=MODEL, messages=[{"role": "user", "content": "Describe a dog as JSON."}],
                        format="json", options={"temperature": 0, "num_predict": 60})
    assert reply.done_reason == "stop"
    assert isinstance(json.loads(reply.message.content), dict)


def test_ollama_generate_format_schema_streamed(client):
    jsonschema = pytest.importorskip("jsonschema")
    parts = list(client.generate(model=MODEL, prompt="Tell me about Paris as JSON.", format=CITY, stream=True,
                                 options={"temperature": 0.7, "seed": 3, "num_predict": 60}))
    assert parts[-1].done and parts[-1].done_reason == "stop"
    jsonschema.validate(json.loads("".join(p.response for p in parts)), CITY)


def test_ollama_bad_schema_is_an_error(client):
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model=MODEL, messages=[{"role": "user", "content": "x"}], format={"type": "objekt"},
                    options={"num_predict": 4})
    assert info.value.status_code == 400 and "objekt" in str(info.value)


def test_openai_response_format_json_schema(http_stack):
    jsonschema = pytest.importorskip("jsonschema")
    oai = openai.OpenAI(base_url=http_stack.url("openai", "/v1"), api_key="unused", max_retries=0, timeout=120)
    reply = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me about Rome as JSON."}], max_tokens=60,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), CITY)


def test_ai00_bnf_schema(http_stack):
    url = http_stack.url("ai00", "/api/oai/chat/completions")
    kbnf = "start ::= 'My favourite number is ' number '.'; number ::= #\"[1-9][0-9]?\";"
    body = {"messages": [{"role": "user", "content": "What is your favourite number?"}], "max_tokens": 20,
            "bnf_schema": kbnf}
    r = httpx.post(url, json=body, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert re.fullmatch(r"My favourite number is [1-9][0-9]?\.", choice["message"]["content"])
    assert choice["finish_reason"] == "stop"
    r = httpx.post(url, json={**body, "bnf_schema": "start ::= 'a' | ;"}, timeout=60)
    assert r.status_code == 400 and "line 1, column" in r.json()["error"]["message"]
