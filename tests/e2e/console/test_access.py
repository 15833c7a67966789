"""Who reaches the console and how: its own port, the API key, the keyboard, and bad input on its socket."""
from __future__ import annotations

import json

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from consolekit import ConsoleStack, open_console, screenshot
from support import free_port

pytestmark = [pytest.mark.e2e]

KEY = "s3cret-console-key"


@pytest.fixture(scope="module")
def keyed_console(tmp_path_factory):
    """The console on its own port, the gateway behind an API key."""
    port = free_port()
    console = ConsoleStack(tmp_path_factory.mktemp("keyed"), ["skel"],
                           {"http.console": str(port), "http.api_key": KEY}).start()
    console.console_url = f"http://127.0.0.1:{port}/"
    yield console
    console.stop()


def test_own_port_and_api_key(keyed_console, browser):
    # Not on the OpenAI port when it has its own; the OpenAI API stays behind the key.
    assert httpx.get(keyed_console.url).status_code == 401
    page = browser()
    page.goto(keyed_console.console_url)
    form = page.locator("#key-form")
    form.wait_for()
    assert page.locator("main").is_hidden()
    page.get_by_label("API key of this board").fill("wrong")
    page.get_by_role("button", name="Connect").click()
    page.get_by_role("alert").filter(has_text="Incorrect API key").wait_for()
    screenshot(page, "key")
    page.get_by_label("API key of this board").fill(KEY)
    page.get_by_role("button", name="Connect").click()
    page.wait_for_selector("body[data-ready=true]")
    assert page.locator("#key-form").is_hidden() and page.locator("#link-state").inner_text() == "connected"


def socket_url(console) -> str:
    return console.console_url.replace("http://", "ws://") + "console/ws"


def test_socket_refuses_a_missing_key_and_survives_bad_input(keyed_console):
    with connect(socket_url(keyed_console)) as ws:
        ws.send(json.dumps({"type": "hello", "key": "nope"}))
        refused = json.loads(ws.recv(timeout=10))
        assert refused["code"] == "invalid_api_key" and refused["status"] == 401
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 4401
    with connect(socket_url(keyed_console)) as ws:
        ws.send(json.dumps({"type": "hello", "key": KEY}))
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
        answers = []
        for bad in ("not json", json.dumps([1, 2]), json.dumps({"type": "launch"}), b"\x00binary",
                    json.dumps({"type": "chat", "id": "c", "body": "hi"}),
                    json.dumps({"type": "chat", "id": "d", "body": {"model": "nope", "messages": []}}),
                    json.dumps({"type": "transcribe", "id": "t", "pcm": "***"}),
                    json.dumps({"type": "raw", "text": 5})):
            ws.send(bad)
            answers.append(json.loads(ws.recv(timeout=10)))
        assert [a["type"] for a in answers] == ["error"] * len(answers)
        assert "not JSON" in answers[0]["message"] and "unknown message type" in answers[2]["message"]
        assert "binary" in answers[3]["message"]
        assert answers[5]["status"] == 404 and "nope" in answers[5]["message"]
        assert answers[6]["id"] == "t" and "base64" in answers[6]["message"]
        # Still usable: a StackFlow ping through the raw view.
        ws.send(json.dumps({"type": "raw", "text": '{"request_id":"p","work_id":"sys","action":"ping"}'}))
        line = json.loads(ws.recv(timeout=10))
        assert line["type"] == "raw" and json.loads(line["text"])["request_id"] == "p"


def test_keyboard_only(llm_console, browser):
    page = open_console(browser(), llm_console)
    chat_tab = page.get_by_role("tab", name="Chat")
    chat_tab.focus()
    page.keyboard.press("ArrowRight")
    assert page.get_by_role("tab", name="Voice").get_attribute("aria-selected") == "true"
    assert page.evaluate("document.activeElement.id") == "tab-voice"
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    assert page.locator("#view-raw").is_visible() and page.locator("#view-chat").is_hidden()
    page.get_by_label("Request", exact=True).focus()
    page.keyboard.press("Control+Enter")
    page.locator("#raw-log span.in").first.wait_for()
    # Every control has a name a screen reader can say.
    unnamed = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button')]
        .filter(e => !e.closest('[hidden]') && !e.labels?.length && !e.getAttribute('aria-label') && !e.textContent.trim())
        .map(e => e.id)""")
    assert unnamed == []


def test_console_off(tmp_path):
    console = ConsoleStack(tmp_path, ["skel"], {"http.console": "off"}).start()
    try:
        assert httpx.get(console.url).status_code == 404
        assert httpx.get(console.url + "console/static/console.js").status_code == 404
        assert httpx.get(console.url + "v1/models").status_code == 200  # the OpenAI API is still there
    finally:
        console.stop()


def test_socket_bounds_the_requests_of_a_page(keyed_console):
    with connect(socket_url(keyed_console)) as ws:
        ws.send(json.dumps({"type": "hello", "key": KEY}))
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
        for _ in range(20):  # each bus view waits about a second for sys.hwinfo's CPU sample
            ws.send(json.dumps({"type": "bus"}))
        answers = [json.loads(ws.recv(timeout=30)) for _ in range(20)]
        kinds = [a["type"] for a in answers]
        assert kinds.count("bus") == 16 and kinds.count("error") == 4
        assert {a["status"] for a in answers if a["type"] == "error"} == {429}


def test_push_to_talk_without_a_microphone_says_so(llm_console, browser):
    page = open_console(browser(), llm_console, "Voice")  # no fake device: this browser has no microphone
    talk = page.get_by_role("button", name="Hold to talk")
    talk.hover()
    page.mouse.down()
    status = page.locator("#voice-status")
    page.wait_for_function("() => document.querySelector('#voice-status').textContent.startsWith('no microphone')")
    page.mouse.up()
    assert talk.get_attribute("aria-pressed") == "false" and "no microphone" in status.inner_text()
