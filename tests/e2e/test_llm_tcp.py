"""The llm unit with the real SmolLM2 model over TCP (spec §8, §10.2, §11.3, §16.1, §18)."""
from __future__ import annotations

import pytest

from support import Stack, StackFlowClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def llm_stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("llm"), ["llm"], {"llm.max_tasks": "2"}).start(timeout=300)
    yield stack
    stack.stop()


def setup_llm(c: StackFlowClient, request_id: str = "setup", **extra) -> str:
    data = {"model": "qwen2.5-0.5B-prefill-20e", "response_format": "llm.utf-8.stream", "input": "llm.utf-8",
            "enoutput": True, "max_token_len": 48, "prompt": "You are a helpful assistant.", "temperature": 0}
    data.update(extra)
    reply = c.request({"request_id": request_id, "work_id": "llm", "action": "setup", "object": "llm.setup",
                       "data": data}, timeout=240)
    assert reply["error"]["code"] == 0, reply
    return reply["work_id"]


def text_of(chunks: list[dict]) -> str:
    return "".join(m["data"]["delta"] for m in chunks)


def test_stream_pause_second_inference_exit(llm_stack):
    with StackFlowClient(llm_stack.port, timeout=120) as c:
        work_id = setup_llm(c, max_token_len=400)
        assert c.request({"request_id": "ti", "work_id": work_id, "action": "taskinfo"})["data"]["model"] == \
            "qwen2.5-0.5B-prefill-20e"
        c.send({"request_id": "long", "work_id": work_id, "action": "inference", "object": "llm.utf-8.stream",
                "data": {"delta": "Write a long story about a dragon.", "index": 0, "finish": True}})
        first = c.read_for("long")
        assert first["data"]["finish"] is False and first["data"]["index"] == 0
        c.send({"request_id": "stop", "work_id": work_id, "action": "pause"})
        messages = []
        while True:
            m = c.read()
            messages.append(m)
            if m["request_id"] == "stop":
                break
        assert messages[-1]["error"]["code"] == 0
        assert messages[-2]["request_id"] == "long" and messages[-2]["data"] == {
            "delta": "", "finish": True, "index": len(messages) - 1}
        assert len(messages) < 100  # stopped well before 400 tokens
        c.send({"request_id": "q", "work_id": work_id, "action": "inference", "object": "llm.utf-8",
                "data": "What is 2 plus 2?"})
        chunks = c.stream("q")
        assert chunks[-1]["data"]["finish"] is True and chunks[-1]["data"]["delta"] == ""
        assert [m["data"]["index"] for m in chunks] == list(range(len(chunks)))
        assert text_of(chunks).strip()
        assert c.request({"request_id": "x", "work_id": work_id, "action": "exit"})["error"]["code"] == 0


def test_greedy_is_deterministic_and_utf8_clean(llm_stack):
    with StackFlowClient(llm_stack.port, timeout=120) as c:
        work_id = setup_llm(c, response_format="llm.utf-8")
        answers = []
        for n in range(2):
            c.send({"request_id": f"g{n}", "work_id": work_id, "action": "inference", "object": "llm.utf-8",
                    "data": "Écris une phrase en français avec des accents."})
            reply = c.read_for(f"g{n}")
            assert reply["object"] == "llm.utf-8" and isinstance(reply["data"], str)
            answers.append(reply["data"])
        assert answers[0] == answers[1] and answers[0]
        for line in c.raw_lines:
            line.decode("utf-8")  # every message is valid UTF-8
        c.request({"request_id": "x", "work_id": work_id, "action": "exit"})


def test_chat_completion_extension_stop_strings_and_context(llm_stack):
    with StackFlowClient(llm_stack.port, timeout=120) as c:
        work_id = setup_llm(c)
        c.send({"request_id": "cc", "work_id": work_id, "action": "inference", "object": "llm.chat_completion",
                "data": {"messages": [{"role": "user", "content": "Count from 1 to 20 separated by commas."}],
                         "max_tokens": 40, "temperature": 0, "stop": ["5"], "return_tokens": True}})
        chunks = c.stream("cc")
        final = chunks[-1]["data"]
        assert final["finish_reason"] == "stop" and "5" not in text_of(chunks)
        usage = final["usage"]
        assert usage["prompt_tokens"] > 5 and 0 < usage["completion_tokens"] <= 40
        assert len(final["tokens"]) == usage["prompt_tokens"] + usage["completion_tokens"]
        c.send({"request_id": "len", "work_id": work_id, "action": "inference", "object": "llm.chat_completion",
                "data": {"prompt": "Tell me about the sea.", "max_tokens": 5}})
        assert c.stream("len")[-1]["data"]["finish_reason"] == "length"
        huge = c.request({"request_id": "big", "work_id": work_id, "action": "inference", "object": "llm.chat_completion",
                          "data": {"prompt": "word " * 9000, "max_tokens": 5}})
        assert huge["error"]["code"] == -35 and "context" in huge["error"]["message"]
        malformed = c.request({"request_id": "fmt", "work_id": work_id, "action": "inference",
                               "object": "llm.chat_completion", "data": {"prompt": "x", "tools": [{"type": "function"}]}})
        assert malformed["error"]["code"] == -2 and "tools[0]" in malformed["error"]["message"]
        light = {"name": "turn_on_light", "parameters": {"type": "object", "properties": {"room": {"type": "string"}},
                                                         "required": ["room"]}}
        c.send({"request_id": "tool", "work_id": work_id, "action": "inference", "object": "llm.chat_completion",
                "data": {"prompt": "Turn on the kitchen light.", "tools": [light], "max_tokens": 60,
                         "tool_choice": "required", "parallel_tool_calls": False}})
        chunks = c.stream("tool")
        called = chunks[-1]["data"]
        assert called["finish_reason"] == "tool_calls" and text_of(chunks) == ""  # the call is not text
        assert [call["name"] for call in called["tool_calls"]] == ["turn_on_light"]
        assert set(called["tool_calls"][0]["arguments"]) == {"room"}
        scored = c.request({"request_id": "sc", "work_id": work_id, "action": "inference", "object": "llm.score",
                            "data": {"input": "The capital of France is", "choices": [" Paris", " banana"]}})
        ranks = {r["index"]: r["perplexity"] for r in scored["data"]}
        assert ranks[0] < ranks[1]
        c.request({"request_id": "x", "work_id": work_id, "action": "exit"})


def test_keep_context_keeps_the_conversation_and_reset_clears_it(llm_stack):
    with StackFlowClient(llm_stack.port, timeout=120) as c:
        work_id = setup_llm(c, response_format="llm.utf-8", keep_context=True, max_token_len=16)

        def turns() -> int:
            return c.request({"request_id": "ti", "work_id": work_id, "action": "taskinfo"})["data"]["context_messages"]

        c.request({"request_id": "a", "work_id": work_id, "action": "inference", "object": "llm.utf-8",
                   "data": "My name is Zorblax."})
        c.request({"request_id": "b", "work_id": work_id, "action": "inference", "object": "llm.utf-8",
                   "data": "What is my name?"})
        assert turns() == 4  # two user turns and two answers
        cleared = c.request({"request_id": "r", "work_id": work_id, "action": "inference", "object": "llm.utf-8", "data": "reset"})
        assert cleared["data"] == "Context has been reset."
        assert turns() == 0
        c.request({"request_id": "x", "work_id": work_id, "action": "exit"})
        stateless = setup_llm(c, response_format="llm.utf-8", max_token_len=8)
        c.request({"request_id": "c", "work_id": stateless, "action": "inference", "object": "llm.utf-8", "data": "Hi"})
        assert c.request({"request_id": "t2", "work_id": stateless, "action": "taskinfo"})["data"]["context_messages"] == 0
        c.request({"request_id": "x2", "work_id": stateless, "action": "exit"})


def test_two_tasks_share_the_model_and_the_third_is_refused(llm_stack):
    with StackFlowClient(llm_stack.port, timeout=120) as c:
        first, second = setup_llm(c, "s1"), setup_llm(c, "s2")
        third = c.request({"request_id": "s3", "work_id": "llm", "action": "setup", "data": {"model": "smollm2-135m-instruct"}})
        assert third["error"]["code"] == -21
        for n, work_id in enumerate((first, second)):
            c.send({"request_id": f"p{n}", "work_id": work_id, "action": "inference", "object": "llm.utf-8", "data": "Hi!"})
        for n, work_id in enumerate((first, second)):
            chunks = c.stream(f"p{n}")
            assert all(m["work_id"] == work_id for m in chunks) and chunks[-1]["data"]["finish"]
        for work_id in (first, second):
            c.request({"request_id": "x", "work_id": work_id, "action": "exit"})
