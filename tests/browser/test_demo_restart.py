"""`lookout demo` restarted between a purchase and its cancellation, as a user does: the real
process on its embedded servers, stopped with SIGTERM and started again on the same data dir.
The emulator remembers the subscription, so Cancel works."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.browser.support import by_testid, sign_in
from tests.support.demo import demo_process

if TYPE_CHECKING:
    from playwright.async_api import Page

pytestmark = [pytest.mark.anyio, pytest.mark.browser, pytest.mark.timeout(240)]


async def status_is(page: Page, testid: str, status: str) -> None:
    await page.locator(f'{by_testid(testid)}[data-status="{status}"]').wait_for()


async def test_cancel_after_the_demo_was_restarted(
    servers_data_dir: Path, page: Page, page_errors: list[str]
) -> None:
    async with demo_process(servers_data_dir) as demo:
        port, api_key = demo.port, demo.api_key
        await page.goto(f"{demo.url}/")
        await sign_in(page, api_key)
        await page.locator(by_testid("subscribe-graph-standard")).click()
        await page.locator(by_testid("resource-name-input")).fill("kept-graph")
        await page.locator(by_testid("checkout-submit")).click()
        await page.wait_for_url(f"{demo.url}/stripe/checkout/**")
        await page.get_by_role("button", name="Pay").click()
        await page.wait_for_url(f"{demo.url}/checkout/return?**")
        await page.locator(f'{by_testid("checkout-return")}[data-phase="completed"]').wait_for()
        async with httpx.AsyncClient(
            base_url=demo.url, headers={"Authorization": f"Bearer {api_key}"}
        ) as http:
            (sub,) = (await http.get("/v1/subscriptions")).json()["data"]
        assert sub["status"] == "active"
        assert await demo.stop(signal.SIGTERM) == 128 + signal.SIGTERM

    async with demo_process(servers_data_dir, port=port) as again:
        assert again.api_key == api_key  # the same key, printed again
        await page.goto(f"{again.url}/")
        sub_id = sub["id"]
        await status_is(page, f"subscription-{sub_id}", "active")
        await page.locator(by_testid(f"cancel-{sub_id}")).click()
        await page.locator(by_testid(f"cancel-at-period-end-{sub_id}")).wait_for()
        await page.locator(by_testid(f"reactivate-{sub_id}")).wait_for()
        async with httpx.AsyncClient(
            base_url=again.url, headers={"Authorization": f"Bearer {api_key}"}
        ) as http:
            after = (await http.get(f"/v1/subscriptions/{sub_id}")).json()
        assert after["cancel_at_period_end"] is True
        assert after["status"] == "active"
        assert page_errors == []
