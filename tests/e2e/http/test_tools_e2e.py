"""Tool calling against a real stack and SmolLM2-135M, driven by the real `openai` and `ollama` clients
(http-apis.md §2.3, §3.4): the call parses, its arguments validate against the tool's schema, the result
goes back and the final answer arrives.

SmolLM2-135M does not choose a tool by itself from a bare question: the conversations start with one
earlier call in their history (as an agent's history holds), after which it calls under "auto"."""
from __future__ import annotations

import json

import httpx
import jsonschema
import ollama
import openai
import pytest

MODEL = "smollm2-135m-instruct"
pytestmark = pytest.mark.e2e

WEATHER = {"name": "get_weather", "description": "Get the current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                          "required": ["city"]}}
LIGHT = {"name": "turn_on_light", "description": "Turn on the light in a room",
         "parameters": {"type": "object", "properties": {"room": {"type": "string"}}, "required": ["room"]}}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": LIGHT}]
SCHEMAS = {WEATHER["name"]: WEATHER["parameters"], LIGHT["name"]: LIGHT["parameters"]}
ASK = "Turn on the light in the kitchen."
OK = json.dumps({"ok": True})


def openai_history() -> list[dict]:
    return [{"role": "user", "content": "Turn on the light in the bedroom."},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_0", "type": "function",
                 "function": {"name": "turn_on_light", "arguments": json.dumps({"room": "bedroom"})}}]},
            {"role": "tool", "tool_call_id": "call_0", "content": OK},
            {"role": "assistant", "content": "The bedroom light is on."},
            {"role": "user", "content": ASK}]


def ollama_history() -> list[dict]:
    return [{"role": "user", "content": "Turn on the light in the bedroom."},
            {"role": "assistant", "content": "",
             "tool_calls": [{"function": {"name": "turn_on_light", "arguments": {"room": "bedroom"}}}]},
            {"role": "tool", "tool_name": "turn_on_light", "content": OK},
            {"role": "assistant", "content": "The bedroom light is on."},
            {"role": "user", "content": ASK}]


def validated(name: str, arguments: dict) -> dict:
    jsonschema.validate(arguments, SCHEMAS[name])
    return arguments


@pytest.fixture(scope="module")
def client(http_stack):
    return openai.OpenAI(base_url=http_stack.url("openai", "/v1"), api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ollama_client(http_stack):
    return ollama.Client(host=http_stack.url("ollama"), timeout=120)


def test_openai_loop(client):
    messages = openai_history()
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=80)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call")
    assert call.function.name == "turn_on_light"
    assert validated(call.function.name, json.loads(call.function.arguments))["room"].lower() == "kitchen"
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": OK}]
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=40)
    assert final.choices[0].finish_reason == "stop" and not final.choices[0].message.tool_calls
    assert "kitchen" in final.choices[0].message.content.lower()


def test_openai_loop_streamed(client):
    messages = openai_history()
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0,
                                                 max_tokens=80, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and deltas[0][0].index == 0  # each call whole, in one delta
    call = deltas[0][0]
    assert call.function.name == "turn_on_light"
    validated(call.function.name, json.loads(call.function.arguments))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)  # the call's text is not content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 5
    messages += [{"role": "assistant", "tool_calls": [{"id": call.id, "type": "function",
                                                        "function": call.function.model_dump()}]},
                 {"role": "tool", "tool_call_id": call.id, "content": OK}]
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=40, stream=True))
    assert "kitchen" in text.lower()


def test_openai_tool_choice(client):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = client.chat.completions.create(model=MODEL, messages=ask, tools=TOOLS, temperature=0, max_tokens=60,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           parallel_tool_calls=False)
    call = named.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert validated(call.function.name, json.loads(call.function.arguments))["city"] == "Paris"
    required = client.chat.completions.create(model=MODEL, messages=ask, tools=TOOLS, temperature=0, max_tokens=60,
                                              tool_choice="required", parallel_tool_calls=False)
    assert required.choices[0].finish_reason == "tool_calls"
    calls = required.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name in SCHEMAS  # without it the model writes prose here
    validated(calls[0].function.name, json.loads(calls[0].function.arguments))
    # Parallel calls: SmolLM2 repeats its call until max_tokens; the complete ones arrive, the cut one does not.
    cut = client.chat.completions.create(model=MODEL, messages=ask, tools=TOOLS, temperature=0, max_tokens=50,
                                         tool_choice="required")
    assert cut.choices[0].finish_reason in ("length", "tool_calls") and cut.choices[0].message.tool_calls
    for call in cut.choices[0].message.tool_calls:
        validated(call.function.name, json.loads(call.function.arguments))
    none = client.chat.completions.create(model=MODEL, messages=openai_history(), tools=TOOLS, temperature=0,
                                          max_tokens=20, tool_choice="none")
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content
    assert none.choices[0].finish_reason in ("stop", "length")


def test_openai_bad_tools(client, http_stack):
    long_code = {"type": "function", "function": {"name": "set_code", "parameters": {
        "type": "object", "properties": {"code": {"type": "string", "minLength": 400}}, "required": ["code"]}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Set a code."}],
                                       tools=[long_code], tool_choice="required", max_tokens=20)
    assert "max_tokens (20)" in info.value.message
    for body, words in (({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}},
                         "no tool named 'fly'"),
                        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0]"),
                        ({"tool_choice": "required"}, "tool_choice needs tools"),
                        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
                            "type": "object", "properties": {"a": {"type": "wat"}}}}}]}, "Invalid type: wat"),
                        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "format")):
        r = httpx.post(http_stack.url("openai", "/v1/chat/completions"),
                       json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 5, **body})
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    r = httpx.post(http_stack.url("openai", "/v1/chat/completions"), json={
        "model": MODEL, "max_tokens": 5, "messages": [{"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].tool_calls[0].function.arguments"


def test_ollama_loop(ollama_client):
    messages = ollama_history()
    first = ollama_client.chat(model=MODEL, messages=messages, tools=TOOLS, options={"temperature": 0})
    call = first.message.tool_calls[0]
    assert call.function.name == "turn_on_light"
    assert validated(call.function.name, dict(call.function.arguments))["room"].lower() == "kitchen"
    assert first.done_reason == "stop" and first.message.content == ""
    messages += [first.message, {"role": "tool", "tool_name": call.function.name, "content": OK}]
    final = ollama_client.chat(model=MODEL, messages=messages, tools=TOOLS, options={"temperature": 0, "num_predict": 40})
    assert not final.message.tool_calls and "kitchen" in final.message.content.lower()


def test_ollama_loop_streamed_think_and_num_ctx(ollama_client):
    chunks = list(ollama_client.chat(model=MODEL, messages=ollama_history(), tools=TOOLS, stream=True, think=True,
                                     keep_alive="300s", options={"temperature": 0, "num_ctx": 4096}))
    calls = [call for c in chunks for call in c.message.tool_calls or []]
    assert len(calls) == 1 and calls[0].function.name == "turn_on_light"  # complete, in one chunk
    validated(calls[0].function.name, dict(calls[0].function.arguments))
    assert chunks[-1].done and chunks[-1].message.thinking == ""  # accepted; SmolLM2 does not think aloud
    # num_ctx is the request's window: the answer ends where the window does.
    prompt = ollama_client.chat(model=MODEL, messages=[{"role": "user", "content": "Count to one hundred."}],
                                options={"num_predict": 1}).prompt_eval_count
    small = ollama_client.chat(model=MODEL, messages=[{"role": "user", "content": "Count to one hundred."}],
                               options={"num_ctx": prompt + 5, "num_predict": 200, "temperature": 0})
    assert small.eval_count == 5 and small.done_reason == "length"
    with pytest.raises(ollama.ResponseError) as info:
        ollama_client.chat(model=MODEL, messages=[{"role": "user", "content": "Count to one hundred."}],
                           options={"num_ctx": prompt - 1})
    assert info.value.status_code == 400


def test_ollama_show_lists_tools(ollama_client):
    assert "tools" in ollama_client.show(MODEL).capabilities

