"""Constrained decoding through the llm unit over TCP (spec §11.3 `format` and `grammar`) with the real
SmolLM2 model."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from support import Stack, StackFlowClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 16},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "pet": {"enum": ["cat", "dog", "none"]}},
          "required": ["name", "age", "pet"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm_stack(tmp_path_factory):
    # The same model under a manifest without the "grammar" capability: its tasks must refuse constraints.
    manifests = tmp_path_factory.mktemp("manifests")
    bundled = json.loads((Path(__file__).resolve().parents[2] / "models" / "mode_smollm2-135m-instruct.json")
                         .read_text())
    plain = {**bundled, "mode": "smollm2-plain", "aliases": [],
             "capabilities": [c for c in bundled["capabilities"] if c != "grammar"]}
    (manifests / "mode_smollm2-plain.json").write_text(json.dumps(plain))
    stack = Stack(tmp_path_factory.mktemp("llm-grammar"), ["llm"], {"models.manifest_dir": str(manifests)})
    stack.start(timeout=300)
    yield stack
    stack.stop()


def setup_llm(c: StackFlowClient, response_format: str, model: str = "smollm2-135m-instruct") -> str:
    reply = c.request({"request_id": "setup", "work_id": "llm", "action": "setup", "object": "llm.setup",
                       "data": {"model": model, "response_format": response_format,
                                "input": "llm.utf-8", "enoutput": True, "max_token_len": 64}}, timeout=240)
    assert reply["error"]["code"] == 0, reply
    return reply["work_id"]


def chat(c: StackFlowClient, work_id: str, rid: str, **data) -> dict:
    return c.request({"request_id": rid, "work_id": work_id, "action": "inference", "object": "llm.chat_completion",
                      "data": {"max_tokens": 60, **data}}, timeout=120)


def test_schema_and_json_streamed(llm_stack):
    jsonschema = pytest.importorskip("jsonschema")
    with StackFlowClient(llm_stack.port, timeout=120) as c:
        work_id = setup_llm(c, "llm.utf-8.stream")
        c.send({"request_id": "schema", "work_id": work_id, "action": "inference", "object": "llm.chat_completion",
                "data": {"messages": [{"role": "user", "content": "Invent a person with a pet, as JSON."}],
                         "format": PERSON, "max_tokens": 60, "temperature": 0.8, "seed": 7}})
        chunks = c.stream("schema")
        assert chunks[-1]["error"]["code"] == 0 and chunks[-1]["data"]["finish_reason"] == "stop"
        text = "".join(m["data"]["delta"] for m in chunks)
        jsonschema.validate(json.loads(text), PERSON)
        c.send({"request_id": "json", "work_id": work_id, "action": "inference", "object": "llm.chat_completion",
                "data": {"prompt": "Describe the weather in Paris as JSON.", "format": "json", "max_tokens": 60,
                         "temperature": 0}})
        chunks = c.stream("json")
        assert chunks[-1]["data"]["finish_reason"] == "stop"
        assert isinstance(json.loads("".join(m["data"]["delta"] for m in chunks)), dict)
        c.request({"request_id": "x", "work_id": work_id, "action": "exit"})


def test_kbnf_whole_answer_and_errors(llm_stack):
    with StackFlowClient(llm_stack.port, timeout=120) as c:
        work_id = setup_llm(c, "llm.utf-8")
        grammar = {"type": "kbnf", "text": "start ::= 'The sky is ' colour '.'; colour ::= 'blue' | 'green' | 'red';"}
        reply = chat(c, work_id, "k", prompt="What colour is the sky?", grammar=grammar)
        assert reply["error"]["code"] == 0, reply
        assert re.fullmatch(r"The sky is (blue|green|red)\.", reply["data"]["text"])
        assert reply["data"]["finish_reason"] == "stop"
        bad = chat(c, work_id, "bad", prompt="x", grammar={"type": "kbnf", "text": "start ::= json_object;"})
        assert bad["error"]["code"] == -2 and "json_object" in bad["error"]["message"]
        bad = chat(c, work_id, "bad2", prompt="x", format={"type": "objekt"})
        assert bad["error"]["code"] == -2 and "objekt" in bad["error"]["message"]
        unsupported = chat(c, work_id, "img", prompt="x", images=["aGVsbG8="])
        assert unsupported["error"]["code"] == -37
        # The task still serves unconstrained requests afterwards.
        plain = chat(c, work_id, "plain", prompt="Say hi.", max_tokens=8)
        assert plain["error"]["code"] == 0 and plain["data"]["text"]
        c.request({"request_id": "x", "work_id": work_id, "action": "exit"})


def test_model_without_grammar_capability_refuses(llm_stack):
    with StackFlowClient(llm_stack.port, timeout=120) as c:
        work_id = setup_llm(c, "llm.utf-8", model="smollm2-plain")
        for rid, key in (("f", {"format": "json"}), ("g", {"grammar": {"type": "lark", "text": 'start: "a"'}})):
            reply = chat(c, work_id, rid, prompt="x", **key)
            assert reply["error"]["code"] == -37 and "smollm2-plain" in reply["error"]["message"]
        c.request({"request_id": "x", "work_id": work_id, "action": "exit"})
