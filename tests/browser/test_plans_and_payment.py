"""The dashboard's side of issue 13 in headless Chromium: Change plan (a refusal says why; a
change shows its resize like any operation), the past-due banner, and Reveal credentials on a
repository subscription."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest

from app.settings import Settings
from tests.browser.support import by_testid, credentials_shown, screenshot, sign_in
from tests.support.stack import Stack, running_stack, wait_for

if TYPE_CHECKING:
    from playwright.async_api import Page

pytestmark = [pytest.mark.anyio, pytest.mark.browser, pytest.mark.timeout(180)]


async def active(stack: Stack, plan: str, name: str) -> dict[str, Any]:
    started = await stack.checkout(plan, name)
    await stack.pay(started["checkout_session_id"])
    return await stack.wait_for_status(started["subscription_id"], "active")


async def wait_status(page: Page, testid: str, status: str) -> None:
    await page.locator(f'{by_testid(testid)}[data-status="{status}"]').wait_for()


async def test_change_plan_shows_the_resize_and_a_refusal_says_why(
    settings: Settings, page: Page, page_errors: list[str]
) -> None:
    async with running_stack(settings) as stack:
        sub = await active(stack, "graph-large", "team-graph")
        login = (await stack.http.post(f"/v1/subscriptions/{sub['id']}/credentials")).json()
        await page.goto(f"{stack.url}/")
        await sign_in(page, stack.api_key)
        await wait_status(page, f"subscription-{sub['id']}", "active")
        change = page.locator(by_testid(f"change-plan-{sub['id']}"))
        dialog = page.locator(by_testid("change-plan-dialog"))

        # Six sessions open: Graph Standard's five would not fit; the dialog says so.
        async with AsyncExitStack() as sessions:
            for _ in range(6):
                conn = await asyncpg.connect(login["dsn"])
                sessions.push_async_callback(conn.close, timeout=2)
            await change.click()
            options = await page.locator(f"{by_testid('change-plan-select')} option").evaluate_all(
                "(os) => os.map((o) => o.value)"
            )
            assert options == ["graph-standard", "graph-xlarge"]
            await page.locator(by_testid("change-plan-select")).select_option("graph-standard")
            await page.locator(by_testid("change-plan-submit")).click()
            error = page.locator(by_testid("change-plan-error"))
            await page.wait_for_function(
                "(el) => el.textContent.includes('connections open')",
                arg=await error.element_handle(),
            )
            assert "allows 5" in await error.inner_text()
            await screenshot(page, "change-plan-refused.png")
            await dialog.get_by_role("button", name="Cancel").click()
        assert (await stack.subscription(sub["id"]))["plan"] == "graph-large"

        await change.click()
        await page.locator(by_testid("change-plan-select")).select_option("graph-standard")
        await page.locator(by_testid("change-plan-submit")).click()
        await dialog.wait_for(state="hidden")

        async def resized() -> str | None:
            found = await stack.subscription(sub["id"])
            return found["operation_id"] if found["operation_id"] != sub["operation_id"] else None

        resize_id = await wait_for(resized, what="the resize operation")
        await wait_status(page, f"operation-{resize_id}", "completed")
        card = page.locator(by_testid(f"subscription-{sub['id']}"))
        assert "Graph Standard" in await card.inner_text()
        steps = await page.locator(f"{by_testid(f'step-log-{resize_id}')} > li").evaluate_all(
            "(lis) => lis.map((li) => li.dataset.step)"
        )
        assert steps == ["apply_limits", "verify_limits"]
        # The card's limits follow the new plan.
        connections = page.locator(by_testid(f"connections-{sub['id']}"))
        await page.wait_for_function(
            "(el) => el.textContent === 'Up to 5 at once'",
            arg=await connections.element_handle(),
        )
        await screenshot(page, "change-plan-resized.png")
        assert page_errors == []


async def test_past_due_shows_a_banner_and_a_repository_reveals_its_login(
    settings: Settings, page: Page, page_errors: list[str]
) -> None:
    async with running_stack(settings) as stack:
        sub = await active(stack, "graph-standard", "late-payer")
        repo = await active(stack, "repository-reader", "reader")
        await page.goto(f"{stack.url}/")
        await sign_in(page, stack.api_key)
        await wait_status(page, f"subscription-{sub['id']}", "active")
        assert await page.locator(by_testid(f"past-due-banner-{sub['id']}")).count() == 0

        async with stack.app.state.services.pool.acquire() as conn:
            stripe_id = await conn.fetchval(
                "SELECT stripe_subscription_id FROM subscriptions WHERE id = $1", sub["id"]
            )
        renewed = await stack.emulator.post(
            f"/_emulator/subscriptions/{stripe_id}/renew", json={"outcome": "failed"}
        )
        assert renewed.status_code == 200, renewed.text
        banner = page.locator(by_testid(f"past-due-banner-{sub['id']}"))
        await banner.wait_for()  # live, from the user's stream
        assert "grace period" in await banner.inner_text()
        await wait_status(page, f"status-{sub['id']}", "past_due")
        assert await page.locator(by_testid(f"change-plan-{sub['id']}")).count() == 0
        await screenshot(page, "past-due.png")

        await page.locator(by_testid(f"reveal-credentials-{repo['id']}")).click()
        dsn = (await credentials_shown(page, repo["id"]))["Connection string"]
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            assert await conn.fetchval("SELECT count(*) FROM repository.countries") == 5
        finally:
            await conn.close()
        assert page_errors == []
