"""Helpers of the web console tests: the stack with the gateway, screenshots, the browser's arguments."""
from __future__ import annotations

import time
from pathlib import Path

import httpx

from support import REPO, Stack, free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOTS = REPO / "test-artifacts" / "console"
MODEL = "smollm2-135m-instruct"


def screenshot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


class ConsoleStack:
    """`unitbus up` with the HTTP gateway (the console on the OpenAI port at /) and the given units."""

    def __init__(self, tmp: Path, units: list[str], settings: dict | None = None, env: dict | None = None):
        self.port = free_port()
        self.stack = Stack(tmp, units, env=env, settings={"up.http": "true", "http.openai.port": str(self.port),
                                        "http.ollama.enabled": "false", "http.ai00.enabled": "false",
                                        "http.cortex.enabled": "false", **(settings or {})})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> "ConsoleStack":
        self.stack.start()
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "livez", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stack.stop(check=False)
                raise RuntimeError("gateway did not come up:\n" + self.stack.log()[-4000:])
            time.sleep(0.2)

    def stop(self) -> None:
        self.stack.stop()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc (clock ticks of 1/100 s on Linux)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_console(page, console: "ConsoleStack", view: str = "Chat"):
    page.goto(console.url)
    page.wait_for_selector("body[data-ready=true]")
    if view != "Chat":
        page.get_by_role("tab", name=view).click()
    return page
