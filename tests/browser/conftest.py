"""Headless Chromium for the browser tests, through Playwright; skipped where it is missing."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.browser.support import SSE_SPY

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page, ViewportSize

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Debian's package; elsewhere (macOS, Fedora, an Ubuntu whose chromium is a snap) the one
# that `playwright install chromium` downloads is the one that works, so it comes first.
SYSTEM_CHROMIUM = [Path("/usr/bin/chromium")]
MISSING = (
    "needs Chromium: run `playwright install chromium` (any system), or install the system's"
    " (Debian: apt-get install chromium), then rerun"
)
DESKTOP: ViewportSize = {"width": 1280, "height": 860}


def find_chromium(playwrights_own: str) -> Path | None:
    """Playwright's own Chromium where `playwright install chromium` put it, else the system's."""
    for candidate in [Path(playwrights_own), *SYSTEM_CHROMIUM]:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if importlib.util.find_spec("playwright") is None:
        pytest.skip(MISSING)
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = find_chromium(playwright.chromium.executable_path)
        if chromium is None:
            pytest.skip(MISSING)
        launched = await playwright.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
def page_errors() -> list[str]:
    """Uncaught exceptions of the page's scripts (a test asserts there were none)."""
    return []


@pytest.fixture
async def page(browser: Browser, page_errors: list[str]) -> AsyncIterator[Page]:
    """A fresh browser context (its own session storage) with the EventSource spy."""
    # Reduced motion: the bar's fill transition would otherwise be caught half-way by a
    # screenshot taken right after the last event (the page honours the setting in CSS).
    context = await browser.new_context(
        viewport=DESKTOP,
        locale="en-US",
        timezone_id="UTC",
        color_scheme="light",
        reduced_motion="reduce",
    )
    context.set_default_timeout(30_000)
    await context.add_init_script(SSE_SPY)
    opened = await context.new_page()
    opened.on("pageerror", lambda error: page_errors.append(f"{error.name}: {error.message}"))
    try:
        yield opened
    finally:
        await context.close()
