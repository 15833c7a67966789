"""Browser fixtures of the web console tests: Playwright for Python driving Debian's chromium.

No browser is downloaded: Playwright launches /usr/bin/chromium (install.sh --test installs it) with a
fresh profile per test. Each test leaves a screenshot of its view in test-artifacts/console/.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import httpx
import pytest

# Under --import-mode=importlib a test folder is not on sys.path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from consolekit import CHROMIUM, CHROMIUM_ARGS, MODEL, ConsoleStack  # noqa: E402


@pytest.fixture
def browser(tmp_path, request):
    """open(extra_args=(), viewport=None) -> a Playwright page in a fresh chromium profile."""
    if shutil.which(CHROMIUM) is None:
        pytest.fail("chromium is required (./install.sh --test installs it)")
    from playwright.sync_api import sync_playwright

    contexts = []
    with sync_playwright() as pw:
        def open_page(extra_args=(), viewport=None, permissions=()):
            context = pw.chromium.launch_persistent_context(
                str(tmp_path / f"profile{len(contexts)}"), executable_path=CHROMIUM, headless=True,
                args=[*CHROMIUM_ARGS, *extra_args], viewport=viewport or {"width": 1280, "height": 900},
                permissions=list(permissions))
            contexts.append(context)
            return context.pages[0] if context.pages else context.new_page()

        yield open_page
        for context in contexts:
            context.close()


@pytest.fixture(scope="session")
def llm_console(tmp_path_factory):
    """The console over a stack with the llm unit (its model loaded once) and skel (cheap tasks to link)."""
    console = ConsoleStack(tmp_path_factory.mktemp("console"), ["llm", "skel"], {"skel.max_tasks": "4"}).start()
    r = httpx.post(console.url + "v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1},
                   timeout=180)
    assert r.status_code == 200, r.text
    yield console
    console.stop()
