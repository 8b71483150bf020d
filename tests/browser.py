"""Headless Debian Chromium for page tests, driven by Playwright (never `playwright install`).

Use it like this::

    with chromium_page() as (page, console_errors):
        page.goto(url)
        ...
        assert console_errors == []

`console_errors` collects console messages of type "error" and uncaught page exceptions. The browser is
/usr/bin/chromium (or $CHATFORGE_CHROMIUM); `.ci/run` installs it with apt-get. When it is missing the test fails
with a message saying so: a page test must not pass without a browser.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--disable-quic", "--no-first-run"]


def chromium_path() -> str:
    path = os.environ.get("CHATFORGE_CHROMIUM", "/usr/bin/chromium")
    if not shutil.which(path):
        raise RuntimeError(f"{path} not found: install Debian's chromium (apt-get install chromium), as .ci/run does")
    return path


@contextmanager
def chromium_page() -> Iterator[tuple[Any, list[str]]]:
    """A fresh headless page and the list its console errors land in."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
            yield page, errors
        finally:
            browser.close()
