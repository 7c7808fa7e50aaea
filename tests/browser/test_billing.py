"""Billing in headless Chromium: "Manage billing" opens the emulator's Customer Portal; a
cancellation made there shows on a dashboard open in another tab as it happens; the invoices
are listed, and a renewal's invoice joins them live."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pytest

from app.settings import Settings
from tests.browser.support import by_testid, screenshot, sign_in, spied_streams
from tests.support.stack import running_stack

if TYPE_CHECKING:
    from playwright.async_api import Page

pytestmark = [pytest.mark.anyio, pytest.mark.browser, pytest.mark.timeout(180)]


def shown_date(iso: str) -> str:
    """A date as the page writes it (en-US, UTC): "Jan 5, 2027"."""
    moment = datetime.fromisoformat(iso).astimezone(UTC)
    return f"{moment:%b} {moment.day}, {moment.year}"


async def test_manage_billing_cancel_in_the_portal_and_the_invoices(
    settings: Settings, page: Page, page_errors: list[str]
) -> None:
    async with running_stack(settings) as stack:
        started = await stack.checkout("graph-standard", "billed-graph")
        sub_id = started["subscription_id"]
        await stack.pay(started["checkout_session_id"])
        await stack.wait_for_status(sub_id, "active")
        (invoice,) = (await stack.http.get("/v1/invoices")).json()["data"]

        # A dashboard, left open in its own tab: it must follow what happens in the portal.
        watcher = await page.context.new_page()
        watcher.on("pageerror", lambda error: page_errors.append(f"{error.message}"))
        await watcher.goto(f"{stack.url}/")
        await sign_in(watcher, stack.api_key)
        row = watcher.locator(by_testid(f"invoice-{invoice['id']}"))
        await row.wait_for()
        assert invoice["number"] in await row.inner_text()
        assert "$29.00" in await row.inner_text()
        status = watcher.locator(by_testid(f"invoice-status-{invoice['id']}"))
        assert await status.get_attribute("data-status") == "paid"
        await watcher.locator('#connection[data-state="live"]').wait_for()

        # Manage billing, in the other tab: off to the portal.
        await page.goto(f"{stack.url}/")
        await sign_in(page, stack.api_key)
        await page.locator(by_testid("manage-billing")).click()
        await page.wait_for_url(f"{stack.emulator_url}/p/session/**")
        assert "Manage your billing" in await page.locator("h1").inner_text()
        await page.get_by_role("button", name="Cancel subscription").click()
        await page.get_by_role("button", name="Renew subscription").wait_for()
        await screenshot(page, "billing-portal.png", full_page=True)

        # The dashboard says so, live: the webhook reached Lookout, and Lookout the page.
        # Webhooks arrive late and out of order in the tests: wait for the notice first.
        notice = watcher.locator(by_testid(f"cancel-at-period-end-{sub_id}"))
        await notice.wait_for()
        cancel_at = (await stack.subscription(sub_id))["cancel_at"]
        assert cancel_at is not None
        assert await notice.inner_text() == f"Cancels on {shown_date(cancel_at)}."
        await watcher.locator(by_testid(f"reactivate-{sub_id}")).wait_for()
        await screenshot(watcher, "dashboard-billing.png", full_page=True)

        # A renewal (the period ends; the cancellation undone first): its invoice appears live.
        await page.get_by_role("button", name="Renew subscription").click()
        await page.get_by_role("button", name="Cancel subscription").wait_for()
        await notice.wait_for(state="detached")
        async with stack.app.state.services.pool.acquire() as conn:
            stripe_id = await conn.fetchval(
                "SELECT stripe_subscription_id FROM subscriptions WHERE id = $1", sub_id
            )
        renewed = await stack.emulator.post(f"/_emulator/subscriptions/{stripe_id}/renew")
        new_invoice = renewed.json()["object"]["latest_invoice"]
        await watcher.locator(
            f'{by_testid(f"invoice-status-{new_invoice}")}[data-status="paid"]'
        ).wait_for()
        assert await watcher.locator(".invoice").count() == 2
        delivered = [
            event[0]
            for record in await spied_streams(watcher, "/v1/events")
            for event in record["events"]
        ]
        assert "invoice.updated" in delivered

        # Back from the portal: the dashboard, where it started.
        await page.get_by_role("link", name="Return to Lookout").click()
        await page.wait_for_url(f"{stack.url}/")
        await page.locator(by_testid(f"invoice-{new_invoice}")).wait_for()
        assert page_errors == []
