"""The browser the console tests drive: Debian's chromium under Playwright, no download."""
from __future__ import annotations

import pytest

from consolekit import screenshot

pytestmark = [pytest.mark.e2e]


def test_chromium_renders_a_page(browser):
    page = browser()
    page.set_content("<main><h1 id='t'>unitbus</h1><button>ok</button></main>")
    assert page.inner_text("#t") == "unitbus"
    assert page.evaluate("navigator.userAgent").count("HeadlessChrome") == 1
    assert screenshot(page, "browser").stat().st_size > 0
