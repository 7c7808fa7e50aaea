"""Headless Chromium for the browser tests, through Playwright; skipped where it is missing."""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.browser.support import SSE_SPY

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page, ViewportSize

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MISSING = "needs Chromium: apt-get install chromium chromium-driver (Debian), then rerun"
DESKTOP: ViewportSize = {"width": 1280, "height": 860}


@pytest.fixture
def chromium() -> Path:
    """The Debian package's Chromium, with Playwright to drive it; else the test is skipped."""
    if not CHROMIUM.exists() or importlib.util.find_spec("playwright") is None:
        pytest.skip(MISSING)
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
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
