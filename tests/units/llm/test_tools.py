"""Tool calling pieces: the request checks, the prompt form, and that constrained decoding gives only plain
text or calls whose arguments validate, even when sampling at a high temperature."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from core.chat_template import tool_messages
from units.llm.sampler import Sampler
from units.llm.tools import is_call, parse_calls, tool_request

LIGHT = {"name": "turn_on_light", "description": "Turn on the light in a room",
         "parameters": {"type": "object", "properties": {"room": {"type": "string"},
                                                         "level": {"type": "integer", "minimum": 1, "maximum": 10}},
                        "required": ["room", "level"]}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}


def generate(engine, tools, choice, messages, temperature=0.0, seed=None, max_new=80, parallel=None):
    from llguidance import LLMatcher

    from units.llm.grammar import GrammarConstraint, llg_tokenizer

    offer = tool_request(tools, choice, parallel)
    ids = engine.encode(engine.chat_prompt(messages, None, tools=offer.tools))
    constraint = GrammarConstraint(llg_tokenizer(engine), LLMatcher.grammar_from_lark(offer.grammar()))
    generation = engine.generate(ids, Sampler(temperature=temperature, seed=seed), max_new, constraint=constraint)
    with generation:
        for _ in generation:
            pass
    return generation


def test_requests_are_checked():
    offer = tool_request([LIGHT, WEATHER], {"type": "function", "function": {"name": "get_weather"}}, False)
    assert [t["name"] for t in offer.tools] == ["turn_on_light", "get_weather"]
    assert offer.choice == "get_weather" and offer.parallel is False
    assert offer.tools[0]["parameters"]["additionalProperties"] is False
    assert tool_request([LIGHT], "none", None) is None and tool_request([], "required", None) is None
    for tools, choice, words in (([LIGHT], "always", "tool_choice"), ([LIGHT], {"name": "fly"}, "no tool named"),
                                 ([LIGHT, LIGHT], None, "share a name"), ([{"name": "a b"}], None, "tools[0]"),
                                 ([{"type": "retrieval"}], None, "tools[0].type"), ("x", None, "tools")):
        with pytest.raises(ValueError, match=re.escape(words)):
            tool_request(tools, choice, None)


def test_tools_are_written_as_hugging_face_chatml_templates_do():
    out = tool_messages([{"role": "user", "content": "Light?"},
                         {"role": "assistant", "content": None, "tool_calls": [{"name": "turn_on_light",
                                                                                "arguments": {"room": "hall"}}]},
                         {"role": "tool", "content": "ok"}, {"role": "tool", "content": "fine"}],
                        [LIGHT], "Be kind.")
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be kind.\n\n# Tools")
    assert json.dumps({"type": "function", "function": LIGHT}) in out[0]["content"]
    assert out[2] == {"role": "assistant",
                      "content": '<tool_call>\n{"name": "turn_on_light", "arguments": {"room": "hall"}}\n</tool_call>'}
    assert out[3] == {"role": "user", "content": "<tool_response>\nok\n</tool_response>\n"
                                                 "<tool_response>\nfine\n</tool_response>"}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_required_calls_validate_when_sampling(engine, seed):
    generation = generate(engine, [LIGHT, WEATHER], "required", [{"role": "user", "content": "Dim the hall."}],
                          temperature=1.5, seed=seed, max_new=120)
    assert is_call(generation.text)
    calls = parse_calls(generation.text)
    assert calls, generation.text
    for call in calls:
        schema = LIGHT["parameters"] if call["name"] == "turn_on_light" else WEATHER["function"]["parameters"]
        jsonschema.validate(call["arguments"], {**schema, "additionalProperties": False})


@pytest.mark.parametrize("seed", [1, 2])
def test_auto_answers_text_that_is_never_a_broken_call(engine, seed):
    generation = generate(engine, [LIGHT], "auto", [{"role": "user", "content": "Tell me about lights."}],
                          temperature=1.2, seed=seed, max_new=30)
    assert generation.text and (not is_call(generation.text) or parse_calls(generation.text))


def test_a_named_choice_calls_that_tool_once(engine):
    generation = generate(engine, [LIGHT, WEATHER], {"name": "get_weather"},
                          [{"role": "user", "content": "Weather in Oslo?"}], parallel=False)
    offer = tool_request([LIGHT, WEATHER], {"name": "get_weather"}, False)
    assert offer.grammar().count('"const": "get_weather"') == 1 and "turn_on_light" not in offer.grammar()
    calls = parse_calls(generation.text)
    assert [c["name"] for c in calls] == ["get_weather"] and generation.finish_reason == "stop"


def test_a_repeated_call_is_kept_once_and_a_cut_one_dropped():
    one = '<tool_call>\n{"name":"turn_on_light","arguments":{"room":"hall"}}\n</tool_call>'
    other = '<tool_call>\n{"name":"turn_on_light","arguments":{"room":"attic"}}\n</tool_call>'
    text = "\n".join([one, other, one]) + '\n<tool_call>\n{"name":"turn_on'
    assert parse_calls(text) == [{"name": "turn_on_light", "arguments": {"room": "hall"}},
                                 {"name": "turn_on_light", "arguments": {"room": "attic"}}]
