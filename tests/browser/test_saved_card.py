"""Subscribing again with a saved card, from the dashboard's Subscribe dialog, without
leaving the page for Checkout; and what the dialog says when there is no saved card."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from app.settings import Settings
from tests.browser.support import by_testid, sign_in
from tests.support.stack import running_stack

if TYPE_CHECKING:
    from playwright.async_api import Page

pytestmark = [pytest.mark.anyio, pytest.mark.browser, pytest.mark.timeout(180)]


async def test_subscribe_with_a_saved_card_from_the_dialog(
    settings: Settings, page: Page, page_errors: list[str]
) -> None:
    async with running_stack(settings) as stack:
        first = await stack.checkout("graph-standard", "first-graph")
        await stack.pay(first["checkout_session_id"])
        await stack.wait_for_status(first["subscription_id"], "active")
        await page.goto(f"{stack.url}/")
        await sign_in(page, stack.api_key)
        await page.locator(by_testid(f"subscription-{first['subscription_id']}")).wait_for()

        # No saved default card yet (Checkout's card belongs to its subscription): the dialog
        # says what to do instead.
        await page.locator(by_testid("subscribe-graph-standard")).click()
        await page.locator(by_testid("resource-name-input")).fill("second-graph")
        await page.locator(by_testid("saved-card-submit")).click()
        error = page.locator(by_testid("checkout-error"))
        await error.get_by_text("no saved card").wait_for()
        assert "Continue to checkout" in await error.inner_text()

        async with stack.app.state.services.pool.acquire() as conn:
            customer = await conn.fetchval(
                "SELECT stripe_customer_id FROM subscriptions WHERE id = $1",
                first["subscription_id"],
            )
        saved = await stack.emulator.post(f"/_emulator/customers/{customer}/payment_method")
        assert saved.status_code == 200
        await page.locator(by_testid("saved-card-submit")).click()
        await page.locator(by_testid("subscribe-dialog")).wait_for(state="hidden")
        assert page.url == f"{stack.url}/"  # never sent to Checkout
        second = page.locator('article[data-testid^="subscription-"]', has_text="second-graph")
        await second.and_(page.locator('[data-status="active"]')).wait_for()
        assert page_errors == []
