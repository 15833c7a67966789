"""Conversion progress in the console: the first chat with a model that was never converted shows the
conversion's percent (reported by the llm unit), in the chat and in the bus view, and then the answer."""
from __future__ import annotations

import pytest

from consolekit import ConsoleStack, open_console, screenshot

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_first_setup_shows_conversion_progress(tmp_path, browser):
    cache = tmp_path / "empty-cache"  # nothing converted yet: the first setup converts the GGUF
    console = ConsoleStack(tmp_path / "stack", ["llm"], env={"UNITBUS_CACHE_DIR": str(cache)}).start()
    try:
        bus_page = open_console(browser(), console, "Bus")  # another page watching the bus
        page = open_console(browser(), console)
        page.get_by_label("Max tokens").fill("8")
        page.get_by_label("Message").fill("Hello!")
        page.get_by_role("button", name="Send").click()
        page.wait_for_function("() => (document.querySelector('#messages li.assistant')?.dataset.progress || '')"
                               ".includes('converting:')", timeout=120_000)
        assert page.locator("#messages li.assistant progress").count() == 1
        screenshot(page, "chat-converting")
        # The bus view shows the same conversion.
        bus_page.locator("#loads li[data-stage=converting] progress").wait_for(timeout=120_000)
        assert "smollm2-135m-instruct (llm): converting" in bus_page.locator("#loads").inner_text()
        screenshot(bus_page, "bus-converting")
        answer = page.locator("#messages li.assistant").last
        answer.and_(page.locator("[data-finish]")).wait_for(timeout=300_000)
        bus_page.locator("#loads-card").wait_for(state="hidden", timeout=30_000)
        steps = [s.split(":") for s in answer.get_attribute("data-progress").split(",")]
        converting = [int(p) for stage, p in steps if stage == "converting"]
        # Several steps of the conversion were shown, in order, before the model loaded.
        assert len(converting) >= 3 and converting == sorted(converting), steps
        assert steps[-1][0] in ("converting", "loading")
        assert answer.get_attribute("data-finish") in ("stop", "length")
        assert answer.locator(".content").inner_text().strip()
        assert (cache / "smollm2-135m-instruct").exists() or any(cache.iterdir())
    finally:
        console.stop()
