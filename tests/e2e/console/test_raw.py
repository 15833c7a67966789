"""The console's raw StackFlow view: requests typed in the page, replies as a TCP client reads them."""
from __future__ import annotations

import re

import pytest

from consolekit import open_console, screenshot
from support import StackFlowClient

pytestmark = [pytest.mark.e2e]

CREATED = re.compile(rb'"created":\d+')


def replies(page, count: int) -> list[str]:
    page.wait_for_function(f"() => document.querySelectorAll('#raw-log span.in').length >= {count}", timeout=30_000)
    return page.locator("#raw-log span.in").all_text_contents()


def send(page, text: str) -> None:
    page.get_by_label("Request", exact=True).fill(text)
    page.get_by_label("Request", exact=True).press("Control+Enter")


def tcp_lines(port: int, requests: list[bytes]) -> list[bytes]:
    with StackFlowClient(port) as client:
        out = []
        for request in requests:
            client.send(request)
            out.append(client.read_line())
        return out


def test_ping_and_bus_errors_as_a_tcp_client_sees_them(llm_console, browser):
    page = open_console(browser(), llm_console, "StackFlow")
    requests = [b'{"request_id":"p1","work_id":"sys","action":"ping"}',
                b'{"request_id":"e1","work_id":"llm.9999","action":"exit"}',  # no such task: -6 from sys
                b'{"request_id":"e2","work_id":"sys","action":"launch"}',  # unknown sys action: -3
                b'{"request_id":"e3","work_id":"sys","action":"ping"']  # cut short, then a stray brace
    for i, request in enumerate(requests[:3]):
        send(page, request.decode())
        replies(page, i + 1)
    send(page, requests[3].decode())
    send(page, "}}")
    shown = replies(page, 5)
    expected = tcp_lines(llm_console.stack.port, [*requests[:3], requests[3] + b"}}", b""])
    # Byte for byte what the bridge's TCP port answers, but for the clock.
    assert [CREATED.sub(b"", s.encode()) for s in shown] == [CREATED.sub(b"", e) for e in expected]
    assert '"error":{"code":0,"message":""}' in shown[0] and '"request_id":"p1"' in shown[0]
    assert '"code":-6' in shown[1] and "Unit Does Not Exist" in shown[1]
    assert '"code":-3' in shown[2]
    # The stray brace is answered by the framer at once, before the ping it closed comes back from sys.
    assert '"code":-1,"message":"reace reset"' in shown[3] and '"request_id":"e3"' in shown[4]
    # Errors are shown as such to the person.
    errors = page.locator("#raw-log span.in.err")
    assert errors.count() == 3
    screenshot(page, "stackflow")
