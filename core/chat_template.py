"""Chat prompts: the ChatML form written out, and any other template a model file ships, rendered in
jinja2's sandbox (a GGUF's template is untrusted input). The converter decides at conversion which one a
model uses and refuses a template that does not render, so no request fails on it later.

Rendered as Hugging Face's apply_chat_template does (trim_blocks, lstrip_blocks, loop controls,
`raise_exception`), which is what the templates inside GGUF files are written for.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

# Conversations the converter renders to decide a template's form; they cover the turns requests send.
PROBES: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "Hello"},),
    ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}),
    ({"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"}, {"role": "user", "content": "Three"}),
)


class TemplateError(ValueError):
    """A chat template that does not compile or does not render a plain conversation."""


def message_text(content: Any) -> str:
    """A message's content as text: a string, or OpenAI-style parts of type "text"."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text"]
        if len(parts) == len(content):
            return "".join(parts)
    raise TypeError(f"message content must be a string or a list of text parts, not {type(content).__name__}")


def chatml_prompt(messages: Sequence[Mapping[str, Any]], default_system: str | None,
                  add_generation_prompt: bool = True) -> str:
    """The ChatML prompt, as the GGUF's template renders it: a system turn with `default_system` is
    inserted when the first message is not a system message (none when default_system is empty)."""
    out = []
    if default_system and (not messages or messages[0].get("role") != "system"):
        out.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
    for m in messages:
        out.append(f"<|im_start|>{m['role']}\n{message_text(m.get('content', ''))}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


class JinjaTemplate:
    """A model's own chat template, compiled once in an immutable sandbox."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the chat template does not compile: {exc}") from None
        self._tokens = {"bos_token": bos_token, "eos_token": eos_token}

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        import jinja2

        plain = [{**m, "content": message_text(m.get("content", ""))} for m in messages]
        try:
            return self._template.render(messages=plain, add_generation_prompt=add_generation_prompt,
                                         **self._tokens, **extra)
        except TemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise TemplateError(f"the chat template failed: {type(exc).__name__}: {exc}") from None


def template_form(source: str, default_system: str | None, bos_token: str = "", eos_token: str = "") -> str:
    """"chatml" when the template renders every probe exactly as chatml_prompt does (the engine then
    skips jinja2), else "jinja". Raises TemplateError for a template that is missing or does not render."""
    if not source.strip():
        raise TemplateError("the model has no chat template (GGUF key tokenizer.chat_template)")
    template = JinjaTemplate(source, bos_token, eos_token)
    same = True
    for probe in PROBES:
        for add_generation_prompt in (True, False):
            rendered = template.render(probe, add_generation_prompt)
            if not rendered.strip():
                raise TemplateError("the chat template renders a conversation as empty text")
            same = same and rendered == chatml_prompt(probe, default_system, add_generation_prompt)
    return "chatml" if same else "jinja"


# Tools, for templates without tool support (SmolLM2's has none): the form of Hugging Face's tool-use
# templates for ChatML models (Hermes, Qwen2.5): the signatures in a <tools> block of the system turn,
# calls as <tool_call> JSON, results as a user turn of <tool_response> blocks.
TOOLS_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')
CALL_OPEN, CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"


def tool_call_text(name: str, arguments: Any) -> str:
    """One call as the model writes it (and as the llm unit's grammar makes it write it)."""
    return CALL_OPEN + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + CALL_CLOSE


def tool_messages(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]],
                  default_system: str | None) -> list[dict[str, str]]:
    """Messages with the offered tools, assistant `tool_calls` ({name, arguments}) and `tool` results
    written as plain turns. Consecutive tool results share one user turn, as in Qwen2.5's template."""
    out: list[dict[str, str]] = []
    rest = list(messages)
    if tools:
        system = default_system or ""
        if rest and rest[0].get("role") == "system":
            system = message_text(rest.pop(0).get("content") or "")
        block = "\n".join(json.dumps({"type": "function", "function": dict(t)}, ensure_ascii=False) for t in tools)
        out.append({"role": "system", "content": (system + "\n\n" if system else "") + TOOLS_SYSTEM.format(tools=block)})
    for m in rest:
        content = message_text(m.get("content") or "")
        if m.get("role") == "tool":
            response = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].endswith("</tool_response>"):
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response})
            continue
        calls = [tool_call_text(c["name"], c.get("arguments", {})) for c in m.get("tool_calls") or []]
        out.append({"role": m["role"], "content": "\n".join(([content] if content else []) + calls)})
    return out
