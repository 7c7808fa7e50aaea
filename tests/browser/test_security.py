"""The pages under their Content-Security-Policy in a real browser, laid out as `lookout demo`
lays them out (the Stripe emulator mounted at /stripe on the same origin): nothing refused,
the emulator's inline style allowed by its own policy; and a checkout return link with planted
text does not get that text shown in the site's own banner (issue 17)."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING
from urllib.parse import quote

import anyio
import pytest
from starlette.routing import Mount

from app.application import create_app
from app.demo.runner import EMULATOR_MOUNT
from app.demo.stripe_emulator import create_emulator
from app.settings import Settings
from app.users import create_api_key, create_user
from tests.browser.support import by_testid, sign_in
from tests.support.live import free_port, live_server
from tests.support.stack import drop_resources

if TYPE_CHECKING:
    from playwright.async_api import ConsoleMessage, Page

pytestmark = [pytest.mark.anyio, pytest.mark.browser, pytest.mark.timeout(180)]

PLANTED = "Your account is locked: call +1 555 0100"


@contextlib.asynccontextmanager
async def demo_layout(settings: Settings) -> AsyncIterator[tuple[str, str]]:
    """Lookout with the emulator mounted as in the demo; answers (base URL, API key)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    secret = f"whsec_{secrets.token_hex(16)}"
    settings = replace(
        settings,
        public_url=base,
        stripe_api_base=base + EMULATOR_MOUNT,
        stripe_webhook_secrets=(secret,),
    )
    emulator = create_emulator(
        webhook_url=f"{base}/v1/webhooks/stripe",
        webhook_secret=secret,
        public_url=base + EMULATOR_MOUNT,
        api_key=settings.stripe_api_key,
    )
    app = create_app(settings, extra_routes=[Mount(EMULATOR_MOUNT, emulator)])
    async with live_server(app, port=port):
        async with app.state.services.pool.acquire() as conn:
            user = await create_user(conn, "csp@example.com")
            key = await create_api_key(conn, user.id)
        try:
            yield base, key
        finally:
            with anyio.CancelScope(shield=True):
                # Mounted, the emulator's own lifespan does not run: close its webhook client.
                await emulator.state.emulator.webhooks.aclose()
                await drop_resources(settings, app)


async def test_the_pages_work_under_their_policies(
    settings: Settings, page: Page, page_errors: list[str]
) -> None:
    refused: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            refused.append(f"{page.url}: {message.text}")

    page.on("console", on_console)
    async with demo_layout(settings) as (base, key):
        await page.goto(f"{base}/")
        await sign_in(page, key)
        await page.locator(by_testid("no-subscriptions")).wait_for()
        await page.locator(by_testid("subscribe-graph-standard")).click()
        await page.locator(by_testid("resource-name-input")).fill("csp-graph")
        await page.locator(by_testid("checkout-submit")).click()

        # The emulator's page, same origin, its inline style allowed by hash.
        await page.wait_for_url(f"{base}{EMULATOR_MOUNT}/checkout/**")
        pay = page.get_by_role("button", name="Pay")
        color = await pay.evaluate("(el) => getComputedStyle(el).backgroundColor")
        assert color == "rgb(99, 91, 255)"
        await pay.click()

        # Back on the return page, which follows the set-up over its streams to the end.
        await page.wait_for_url(f"{base}/checkout/return?**")
        await page.locator(f'{by_testid("checkout-return")}[data-phase="completed"]').wait_for()

        # A crafted link: the page says what it knows in its own words.
        await page.goto(f"{base}/checkout/return?session_id={quote(PLANTED)}")
        banner = page.locator(by_testid("error-banner"))
        await banner.wait_for(state="visible")
        shown = await banner.inner_text()
        assert "There is no such checkout" in shown
        assert "555" not in shown and "locked" not in shown
        assert PLANTED not in await page.locator("body").inner_text()
    assert refused == []
    assert page_errors == []
