"""The dashboard tells a customer whose provisioning failed that their money came back."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from app.settings import Settings
from provisioning import GraphBackend
from tests.browser.support import by_testid, sign_in
from tests.support.failing_backend import FailingBackend
from tests.support.stack import running_stack

if TYPE_CHECKING:
    from playwright.async_api import Page

pytestmark = [pytest.mark.anyio, pytest.mark.browser, pytest.mark.timeout(180)]


async def test_a_failed_subscription_card_shows_its_refund_live(
    settings: Settings, page: Page, page_errors: list[str]
) -> None:
    assert settings.database_url is not None
    backends = [FailingBackend(GraphBackend(settings.database_url))]
    async with running_stack(settings, backends=backends) as stack:
        await page.goto(f"{stack.url}/")
        await sign_in(page, stack.api_key)
        await page.locator(by_testid("no-subscriptions")).wait_for()
        # Bought and paid while the page is open: the card arrives and changes live.
        started = await stack.checkout("graph-standard", "doomed")
        await stack.pay(started["checkout_session_id"])
        sub_id = started["subscription_id"]
        card = page.locator(f'{by_testid(f"subscription-{sub_id}")}[data-status="failed"]')
        await card.wait_for()
        refund = card.locator(by_testid(f"refund-{sub_id}"))
        await refund.wait_for()
        assert (await refund.text_content() or "").strip() == "Refunded $29.00"
        # The same after a reload (still signed in), from the subscription's snapshot.
        await page.reload()
        assert (await page.locator(by_testid(f"refund-{sub_id}")).text_content() or "").strip() == (
            "Refunded $29.00"
        )
    assert page_errors == []
