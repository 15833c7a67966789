"""The console's live bus view: units with pid, tasks and links as a graph, hwinfo, models with licences."""
from __future__ import annotations

import pytest

from consolekit import MODEL, open_console, screenshot
from support import StackFlowClient

pytestmark = [pytest.mark.e2e]

SKEL = {"model": "skel-upper", "response_format": "skel.utf-8.stream", "input": "skel.utf-8", "enoutput": True}


def setup(client: StackFlowClient, rid: str) -> str:
    reply = client.request({"request_id": rid, "work_id": "skel", "action": "setup", "object": "skel.setup",
                            "data": SKEL})
    assert reply["error"]["code"] == 0, reply
    return reply["work_id"]


def test_a_link_set_up_over_tcp_appears_in_the_graph(llm_console, browser):
    page = open_console(browser(), llm_console, "Bus")
    with StackFlowClient(llm_console.stack.port) as tcp:
        upstream, downstream = setup(tcp, "s1"), setup(tcp, "s2")
        link = tcp.request({"request_id": "l", "work_id": downstream, "action": "link", "object": "work_id",
                            "data": upstream})
        assert link["error"]["code"] == 0, link
        edge = page.locator(f'#graph path.edge[data-from="{upstream}"][data-to="{downstream}"]')
        edge.wait_for(state="attached", timeout=30_000)
        assert page.locator(f'#graph g.node[data-id="{upstream}"]').count() == 1
        assert f"{upstream} feeds {downstream}" in page.locator("#graph title").text_content()
        task_row = page.locator("#tasks tbody tr", has_text=downstream)
        assert upstream in task_row.inner_text()
        # Units with their state and the pid of their process.
        llm_row = page.locator("#units tbody tr", has_text="llm")
        cells = llm_row.locator("td").all_inner_texts()
        assert cells[:3] == ["llm", "running", str(llm_console.stack.pid_of("llm"))]
        not_started = page.locator("#units tbody tr", has_text="tts").locator("td").all_inner_texts()
        assert not_started[:2] == ["tts", "not running"]
        # hwinfo and the models from lsmode with their licence.
        board = page.locator("#hwinfo").inner_text()
        assert "CPU load" in board and "%" in board and "memory used" in board
        model_row = page.locator("#models tbody tr", has_text=MODEL).locator("td").all_inner_texts()
        assert model_row[:3] == [MODEL, "llm", "Apache-2.0"]
        assert "CC BY-NC-SA 4.0" in page.locator("#models").inner_text()  # the wake word heads' licence
        screenshot(page, "bus")
        # Unlinked over TCP: the arrow goes at the next refresh.
        tcp.request({"request_id": "u", "work_id": downstream, "action": "unlink", "object": "work_id",
                     "data": upstream})
        edge.wait_for(state="detached", timeout=30_000)
        for work_id in (downstream, upstream):
            tcp.request({"request_id": "x", "work_id": work_id, "action": "exit"})


def test_bus_view_fits_a_phone(llm_console, browser):
    page = open_console(browser(viewport={"width": 390, "height": 844}), llm_console, "Bus")
    page.wait_for_function("() => Number(document.body.dataset.busUpdates) >= 1", timeout=30_000)
    # Nothing wider than the screen: the page scrolls vertically only.
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    screenshot(page, "bus-phone")
    page.get_by_role("tab", name="Chat").click()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    screenshot(page, "chat-phone")
