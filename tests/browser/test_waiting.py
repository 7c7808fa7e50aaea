"""The dashboard while the provisioning server does not answer: the operation shows as
waiting, with the reason and the next try, and carries on when the server is back."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import pytest

from app.settings import Settings
from bench.chaos.proxy import fault_proxy, url_through
from tests.browser.support import by_testid, operation_id_of, screenshot, sign_in
from tests.support.stack import running_stack

if TYPE_CHECKING:
    from playwright.async_api import Page

pytestmark = [pytest.mark.anyio, pytest.mark.browser, pytest.mark.timeout(180)]


async def test_a_waiting_operation_says_why_and_completes_when_the_server_is_back(
    settings: Settings, pg_admin_dsn: str, page: Page, page_errors: list[str]
) -> None:
    async with fault_proxy("provisioner", pg_admin_dsn) as proxy:
        await proxy.refuse()
        through_proxy = replace(
            settings, provisioner_database_urls=(url_through(pg_admin_dsn, proxy.port),)
        )
        async with running_stack(through_proxy) as stack:
            await page.goto(f"{stack.url}/")
            await sign_in(page, stack.api_key)
            await page.locator('#connection[data-state="live"]').wait_for()
            started = await stack.checkout("graph-standard", "waiting-graph")
            await stack.pay(started["checkout_session_id"])
            op_id = await operation_id_of(stack, started["subscription_id"])

            badge = page.locator(f'{by_testid(f"operation-status-{op_id}")}[data-status="waiting"]')
            await badge.wait_for(timeout=60_000)
            assert await badge.text_content() == "Waiting"
            current = await page.locator(by_testid(f"step-{op_id}")).text_content()
            assert current is not None
            assert current.startswith("The database server is not answering; retrying in")
            await screenshot(page, "waiting.png")

            await proxy.accept()
            await page.locator(
                f'{by_testid(f"operation-status-{op_id}")}[data-status="completed"]'
            ).wait_for(timeout=60_000)
    assert page_errors == []
