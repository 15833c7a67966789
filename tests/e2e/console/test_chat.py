"""The console's chat view in a real browser: streaming, stop, sampling and constrained output."""
from __future__ import annotations

import json
import time

import pytest

from consolekit import MODEL, cpu_seconds, open_console, screenshot

pytestmark = [pytest.mark.e2e]

# Records the length of the answer each time the page changes it, so a test sees the text grow.
WATCH = """() => {
  window.lengths = [];
  new MutationObserver(() => {
    const items = document.querySelectorAll('#messages li.assistant .content');
    if (items.length) window.lengths.push(items[items.length - 1].textContent.length);
  }).observe(document.querySelector('#messages'), {subtree: true, childList: true, characterData: true});
}"""


def ask(page, text: str) -> None:
    page.get_by_label("Message").fill(text)
    page.get_by_role("button", name="Send").click()


def test_chat_streams_token_by_token(llm_console, browser):
    page = open_console(browser(), llm_console)
    assert page.locator("#model option").all_inner_texts() == [MODEL]
    page.get_by_label("Max tokens").fill("48")
    page.get_by_label("Temperature").fill("0")
    page.evaluate(WATCH)
    ask(page, "Write three sentences about the sea.")
    answer = page.locator("#messages li.assistant").last
    answer.and_(page.locator("[data-finish]")).wait_for(timeout=120_000)
    lengths = page.evaluate("window.lengths")
    growing = sorted(set(n for n in lengths if n > 0))
    # Token by token: the answer was shown at many lengths on its way, not once at the end.
    assert len(growing) >= 5, lengths
    assert lengths[-1] == max(lengths) == len(answer.locator(".content").inner_text())
    assert answer.get_attribute("data-finish") in ("stop", "length")
    assert int(answer.get_attribute("data-chunks")) >= 5
    screenshot(page, "chat")


def test_stop_cancels_the_generation(llm_console, browser):
    page = open_console(browser(), llm_console)
    page.get_by_label("Max tokens").fill("1000")
    ask(page, "Tell a very long story about a lighthouse keeper, with many chapters.")
    answer = page.locator("#messages li.assistant").last
    page.wait_for_function("() => Number(document.querySelector('#messages li.assistant:last-child')?.dataset.chunks) >= 5",
                           timeout=120_000)
    page.get_by_role("button", name="Stop").click()
    answer.and_(page.locator("[data-finish]")).wait_for(timeout=10_000)
    assert answer.get_attribute("data-finish") == "stopped"
    assert "stopped" in answer.inner_text()
    tokens = int(answer.get_attribute("data-chunks"))
    assert tokens < 1000
    # The llm task is idle within 1 s: one second after the stop its process burns (almost) no CPU,
    # where a running generation keeps its onnxruntime threads busy.
    pid = llm_console.stack.pid_of("llm")
    time.sleep(1.0)
    before = cpu_seconds(pid)
    time.sleep(1.0)
    assert cpu_seconds(pid) - before < 0.25
    assert page.get_by_role("button", name="Send").is_enabled()
    assert page.get_by_role("button", name="Stop").is_disabled()
    screenshot(page, "chat-stopped")


def test_system_prompt_sampling_and_json_schema(llm_console, browser):
    page = open_console(browser(), llm_console)
    page.get_by_label("System prompt").fill("You answer in JSON.")
    page.get_by_label("Seed").fill("7")
    page.get_by_label("Max tokens").fill("64")
    page.get_by_label("Output constraint").select_option("json_schema")
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    page.get_by_label("Schema or grammar").fill(json.dumps(schema))
    ask(page, "Which city is the capital of France?")
    answer = page.locator("#messages li.assistant").last
    answer.and_(page.locator("[data-finish]")).wait_for(timeout=120_000)
    value = json.loads(answer.locator(".content").inner_text())
    assert list(value) == ["city"] and isinstance(value["city"], str)
    # A GBNF grammar: the answer is one of its sentences.
    page.get_by_label("Output constraint").select_option("gbnf")
    page.get_by_label("Schema or grammar").fill('root ::= "yes" | "no"')
    ask(page, "Is Paris in France?")
    answer = page.locator("#messages li.assistant").last
    answer.and_(page.locator("[data-finish]")).wait_for(timeout=120_000)
    assert answer.locator(".content").inner_text() in ("yes", "no")
    # The sampling settings reach the unit: max tokens cuts the answer.
    page.get_by_label("Output constraint").select_option("")
    page.get_by_label("Max tokens").fill("3")
    ask(page, "Count from one to twenty.")
    answer = page.locator("#messages li.assistant").last
    answer.and_(page.locator("[data-finish]")).wait_for(timeout=120_000)
    assert answer.get_attribute("data-finish") == "length" and int(answer.get_attribute("data-chunks")) <= 3
    assert "cut at max tokens" in answer.inner_text()
    # A grammar the converter rejects is an error shown in the conversation, and the page stays usable.
    page.get_by_label("Output constraint").select_option("gbnf")
    page.get_by_label("Schema or grammar").fill("root ::= (")
    ask(page, "Yes or no?")
    failed = page.locator("#messages li.assistant").last
    failed.and_(page.locator("[data-finish=error]")).wait_for(timeout=60_000)
    assert failed.get_by_role("alert").inner_text().strip()
    screenshot(page, "chat-json-schema")


def test_closing_the_page_stops_its_generation(llm_console, browser):
    page = open_console(browser(), llm_console)
    page.get_by_label("Max tokens").fill("1000")
    ask(page, "Tell a very long story about a lighthouse keeper, with many chapters.")
    page.wait_for_function("() => Number(document.querySelector('#messages li.assistant:last-child')?.dataset.chunks) >= 3",
                           timeout=120_000)
    rid_count = llm_console.stack.log().count("client gone, cancelling")
    page.context.close()
    deadline = time.monotonic() + 10
    while llm_console.stack.log().count("client gone, cancelling") == rid_count and time.monotonic() < deadline:
        time.sleep(0.1)
    assert llm_console.stack.log().count("client gone, cancelling") == rid_count + 1
    pid = llm_console.stack.pid_of("llm")
    time.sleep(1.0)
    before = cpu_seconds(pid)
    time.sleep(1.0)
    assert cpu_seconds(pid) - before < 0.25


def test_a_lost_connection_is_said_and_the_page_reconnects(llm_console, browser):
    page = open_console(browser(), llm_console)
    page.get_by_label("Max tokens").fill("1000")
    ask(page, "Tell a very long story about a lighthouse keeper, with many chapters.")
    page.wait_for_function("() => Number(document.querySelector('#messages li.assistant:last-child')?.dataset.chunks) >= 3",
                           timeout=120_000)
    page.evaluate("ws.close()")
    lost = page.locator("#messages li.assistant").last
    lost.and_(page.locator("[data-finish=error]")).wait_for(timeout=10_000)
    assert "connection to the board was lost" in lost.get_by_role("alert").inner_text()
    page.wait_for_function("() => document.querySelector('#link-state').textContent === 'connected'", timeout=30_000)
    page.get_by_label("Max tokens").fill("4")
    ask(page, "Hi!")
    again = page.locator("#messages li.assistant").last
    again.and_(page.locator("[data-finish=length], [data-finish=stop]")).wait_for(timeout=60_000)
    assert again.locator(".content").inner_text()
