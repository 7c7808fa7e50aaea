"""A `subscription.updated` published late (two handlers of one subscription run side by side
and publish after their commits, in any order) must not take the dashboard back in time."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from app.settings import Settings
from streams import Event, user_topic
from tests.browser.support import by_testid, sign_in
from tests.support.stack import running_stack

if TYPE_CHECKING:
    from playwright.async_api import Page

pytestmark = [pytest.mark.anyio, pytest.mark.browser, pytest.mark.timeout(180)]


async def test_an_older_subscription_update_published_late_is_dropped(
    settings: Settings, page: Page, page_errors: list[str]
) -> None:
    async with running_stack(settings) as stack:
        started = await stack.checkout("graph-standard", "late-news")
        await stack.pay(started["checkout_session_id"])
        active = await stack.wait_for_status(started["subscription_id"], "active")
        await page.goto(f"{stack.url}/")
        await sign_in(page, stack.api_key)
        card = page.locator(by_testid(f"subscription-{active['id']}"))
        await card.and_(page.locator('[data-status="active"]')).wait_for()
        # The card comes from the snapshot; only a live stream receives what is published next
        # (a stream opened without a position is sent no history). CI under load published
        # before the dashboard's stream had opened once.
        await page.locator('#connection[data-state="live"]').wait_for()

        publisher = stack.app.state.services.publisher
        topic = [user_topic(stack.user_id)]
        stale = active | {"status": "provisioning", "updated_at": active["created_at"]}
        await publisher.publish(
            Event.create("subscription.updated", subscription_id=active["id"], subscription=stale),
            topic,
        )
        # The same stream delivers in order: once this one shows, the stale one was handled.
        marker = active | {"id": "sub_marker", "resource_name": "marker", "status": "expired"}
        await publisher.publish(
            Event.create("subscription.updated", subscription_id="sub_marker", subscription=marker),
            topic,
        )
        await page.locator(by_testid("subscription-sub_marker")).wait_for()
        assert await card.get_attribute("data-status") == "active"
        assert page_errors == []
