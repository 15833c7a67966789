"""Tool calling for llm.chat_completion: the request's `tools`, `tool_choice` and `parallel_tool_calls`
checked, the grammar that lets the model answer only with plain text or with calls whose arguments
validate against their tool's JSON schema, and the answer parsed back into calls. Engine-side helper:
no bus.

The calls are written as in Hugging Face's tool-use templates for ChatML models (core/chat_template.py):
`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one per line with parallel calls. Plain
text may not start with "<", so the first token already tells a call from an answer.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from core.chat_template import CALL_CLOSE, CALL_OPEN
from units.llm.grammar import JSON_DEFAULTS

NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)


@dataclass
class ToolRequest:
    tools: list[dict[str, Any]]  # [{name, description, parameters}]
    choice: str  # "auto", "required" or a tool's name
    parallel: bool

    def grammar(self) -> str:
        """The Lark grammar (llguidance dialect) of every answer this request allows."""
        offered = [t for t in self.tools if self.choice in ("auto", "required") or t["name"] == self.choice]
        shapes = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                   "properties": {"name": {"const": t["name"]}, "arguments": t["parameters"]}} for t in offered]
        schema = {"x-guidance": JSON_DEFAULTS, **(shapes[0] if len(shapes) == 1 else {"anyOf": shapes})}
        calls = 'call ("\\n" call)*' if self.parallel else "call"
        start = "calls" if self.choice != "auto" else "TEXT | calls"
        return (f"start: {start}\n"
                f"calls: {calls}\n"
                f"call: {json.dumps(CALL_OPEN)} body {json.dumps(CALL_CLOSE)}\n"
                f"body: %json {json.dumps(schema)}\n"
                "TEXT: /[^<](?s:.)*/\n")


def tool_request(tools: Any, choice: Any, parallel: Any) -> ToolRequest | None:
    """The request's tools (OpenAI's {"type": "function", "function": {...}} or the bare function), or
    None when none are offered or tool_choice is "none". ValueError names what is malformed."""
    if tools in (None, []):
        return None
    if not isinstance(tools, list):
        raise ValueError("tools: expected a list of functions")
    out = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and "function" in tool else tool
        if isinstance(tool, dict) and tool.get("type", "function") != "function":
            raise ValueError(f"tools[{i}].type: only \"function\" tools are supported")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not NAME.match(function["name"]):
            raise ValueError(f"tools[{i}]: expected a function with a name of 1-64 letters, digits, _ . : -")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise ValueError(f"tools[{i}].parameters: expected a JSON Schema object")
        if parameters.get("type") == "object" and "additionalProperties" not in parameters:
            # Small models otherwise add keys of their own; a schema that wants them says so.
            parameters = {**parameters, "additionalProperties": False}
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise ValueError(f"tools[{i}].description: expected a string")
        out.append({"name": function["name"], "description": description, "parameters": parameters})
    names = [t["name"] for t in out]
    if len(set(names)) != len(names):
        raise ValueError("tools: two functions share a name")
    if choice in (None, "auto"):
        choice = "auto"
    elif choice == "none":
        return None
    elif isinstance(choice, dict):
        choice = (choice.get("function") or {}).get("name") if "function" in choice else choice.get("name")
        if choice not in names:
            raise ValueError(f"tool_choice: no tool named {choice!r} among {', '.join(names)}")
    elif choice != "required":
        raise ValueError('tool_choice: expected "auto", "none", "required" or {"type": "function", '
                         '"function": {"name": ...}}')
    if parallel not in (None, True, False):
        raise ValueError("parallel_tool_calls: expected a boolean")
    return ToolRequest(out, choice, parallel is not False)


def is_call(text: str) -> bool:
    """Whether an answer (or its first characters) is a call: plain text never starts with "<"."""
    return text.startswith("<")


def parse_calls(text: str) -> list[dict[str, Any]]:
    """The calls of a complete answer, as [{name, arguments}] (the grammar made them valid JSON). A call
    repeated word for word is kept once: small models repeat their call, and a client would run it twice."""
    calls: list[dict[str, Any]] = []
    for match in CALL.finditer(text):
        call = json.loads(match.group(1))
        call = {"name": call["name"], "arguments": call["arguments"]}
        if call not in calls:
            calls.append(call)
    return calls
