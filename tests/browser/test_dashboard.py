"""The dashboard in headless Chromium against the real app and the Stripe emulator's hosted
checkout page: a purchase from sign-in to a running graph database and back out, and a page
that loses its streams mid-provisioning and resumes with no missing or doubled step."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest

from app.settings import Settings
from provisioning import GraphBackend, SharedRepositoryBackend
from tests.browser.proxy import SeenRequest, dropping_proxy
from tests.browser.support import (
    GatedBackend,
    ServerEvent,
    by_testid,
    credentials_shown,
    distinct_steps,
    operation_id_of,
    screenshot,
    server_events,
    sign_in,
    spied_streams,
)
from tests.support.stack import running_stack

if TYPE_CHECKING:
    from playwright.async_api import Page, ViewportSize

pytestmark = [pytest.mark.anyio, pytest.mark.browser, pytest.mark.timeout(180)]

PHONE: ViewportSize = {"width": 390, "height": 844}


def graph_steps(admin_dsn: str) -> list[str]:
    """The graph backend's own steps, in order (the runner may add its own around them)."""
    return [step.name for step in GraphBackend(admin_dsn).steps("provision")]


def assert_every_step(listed: list[str], events: list[ServerEvent], backend: list[str]) -> None:
    """The page lists each step of the operation once, in order, the backend's all among them."""
    expected = distinct_steps(events)
    assert [step for step in expected if step in backend] == backend
    assert listed == expected


async def step_log(page: Page, operation_id: str) -> list[str]:
    items = page.locator(f"{by_testid(f'step-log-{operation_id}')} > li")
    steps: list[str] = await items.evaluate_all("(lis) => lis.map((li) => li.dataset.step)")
    return steps


async def bar_value(page: Page, operation_id: str) -> tuple[int, str | None]:
    bar = page.locator(by_testid(f"progress-{operation_id}"))
    value: int = await bar.evaluate("(el) => el.value")
    return value, await bar.get_attribute("aria-valuenow")


async def wait_status(page: Page, testid: str, status: str) -> None:
    await page.locator(f'{by_testid(testid)}[data-status="{status}"]').wait_for()


async def delivered_ids(page: Page, path: str) -> list[str]:
    """Every event id the page's EventSources for ``path`` received, in order of arrival."""
    return [event[1] for record in await spied_streams(page, path) for event in record["events"]]


def assert_whole_story(seen: list[str], events: list[ServerEvent]) -> None:
    assert len(set(seen)) == len(seen), f"an event was delivered twice: {seen}"
    assert seen == [e.id for e in events], "the page missed events or got them out of order"


async def no_horizontal_scroll(page: Page) -> bool:
    fits: bool = await page.evaluate(
        "() => document.documentElement.scrollWidth <= document.documentElement.clientWidth"
    )
    return fits


async def test_sign_in_subscribe_pay_watch_reveal_and_cancel(
    settings: Settings, page: Page, page_errors: list[str]
) -> None:
    admin_dsn = settings.provisioning_servers[0].dsn
    async with running_stack(settings) as stack:
        await page.goto(f"{stack.url}/")
        await sign_in(page, stack.api_key)
        await page.locator(by_testid("no-subscriptions")).wait_for()
        plan = page.locator(by_testid("plan-graph-standard"))
        assert "Graph Standard" in await plan.inner_text()
        # Enforced limits as they are; storage as what it is: measured, not capped.
        assert "5 connections at once" in await plan.inner_text()
        assert "1 GB storage included (measured, not capped)" in await plan.inner_text()
        assert "$29.00" in await page.locator(by_testid("price-graph-standard")).inner_text()

        # Subscribe: the dialog asks for a name, then off to the emulator's hosted page.
        await page.locator(by_testid("subscribe-graph-standard")).click()
        await page.locator(by_testid("resource-name-input")).fill("social-graph")
        await page.locator(by_testid("checkout-submit")).click()
        await page.wait_for_url(f"{stack.emulator_url}/checkout/**")
        assert "Graph Standard" in await page.locator("h1").inner_text()
        await page.get_by_role("button", name="Pay").click()

        # Back on Lookout: the return page follows the set-up from its first step.
        await page.wait_for_url(f"{stack.url}/checkout/return?**")
        session_id = parse_qs(urlsplit(page.url).query)["session_id"][0]
        await page.locator(f'{by_testid("checkout-return")}[data-phase="completed"]').wait_for()
        checkout = (await stack.http.get(f"/v1/checkout/{session_id}")).json()
        op_id, sub_id = checkout["operation_id"], checkout["subscription_id"]
        await wait_status(page, f"operation-{op_id}", "completed")
        await wait_status(page, f"status-{sub_id}", "active")

        events = await server_events(stack, op_id)
        assert events[-1].type == "operation.completed"
        assert await bar_value(page, op_id) == (100, "100")
        backend_steps = graph_steps(admin_dsn)
        assert_every_step(await step_log(page, op_id), events, backend_steps)
        op_path = f"/v1/operations/{op_id}/events"
        assert_whole_story(await delivered_ids(page, op_path), events)
        await screenshot(page, "checkout-return.png")

        # The dashboard: the subscription is active; its credentials are shown once.
        await page.locator(by_testid("back-to-dashboard")).click()
        await page.wait_for_url(f"{stack.url}/")
        await wait_status(page, f"subscription-{sub_id}", "active")
        card = page.locator(by_testid(f"subscription-{sub_id}"))
        assert "social-graph" in await card.inner_text()
        await page.locator(by_testid(f"period-end-{sub_id}")).wait_for()
        storage = page.locator(by_testid(f"storage-{sub_id}"))
        await storage.wait_for()
        assert re.fullmatch(
            r"[\d.]+ MB of 1 GB included \(measured\)", await storage.inner_text()
        ), await storage.inner_text()
        reveal = page.locator(by_testid(f"reveal-credentials-{sub_id}"))
        await reveal.click()
        shown = await credentials_shown(page, sub_id)
        assert await reveal.count() == 0  # no second reveal while these are on screen
        # Where to connect, and a command ready to paste.
        dsn = urlsplit(shown["Connection string"])
        assert (shown["Host"], shown["Port"]) == (dsn.hostname, str(dsn.port))
        assert shown["psql"] == f"psql '{shown['Connection string']}'"
        await screenshot(page, "credentials.png")
        conn = await asyncpg.connect(shown["Connection string"], timeout=10)
        try:
            who = await conn.fetchrow("SELECT current_user AS u, current_database() AS d")
            assert who is not None
            assert (who["u"], who["d"]) == (shown["User"], shown["Database"])
            node = await conn.fetchval(
                "INSERT INTO nodes (labels) VALUES ('{Person}') RETURNING id"
            )
            assert node is not None
        finally:
            await conn.close()
        await page.get_by_role("button", name="I have saved them").click()
        await page.locator(by_testid(f"credentials-{sub_id}")).wait_for(state="detached")
        await reveal.wait_for()
        await screenshot(page, "dashboard.png", full_page=True)

        # Cancel at period end: the card says so, and Stripe was told.
        await page.locator(by_testid(f"cancel-{sub_id}")).click()
        await page.locator(by_testid(f"cancel-at-period-end-{sub_id}")).wait_for()
        await page.locator(by_testid(f"reactivate-{sub_id}")).wait_for()
        after = await stack.subscription(sub_id)
        assert after["cancel_at_period_end"] is True
        assert after["status"] == "active"
        await wait_status(page, f"status-{sub_id}", "active")

        await page.emulate_media(color_scheme="dark")
        await screenshot(page, "dashboard-dark.png")
        await page.emulate_media(color_scheme="light")

        # A phone: nothing wider than the screen; the return page, opened late, tells it all.
        await page.set_viewport_size(PHONE)
        assert await no_horizontal_scroll(page)
        await screenshot(page, "dashboard-phone.png")
        await page.goto(f"{stack.url}/checkout/return?session_id={session_id}")
        await wait_status(page, f"operation-{op_id}", "completed")
        assert_every_step(await step_log(page, op_id), events, backend_steps)
        assert await no_horizontal_scroll(page)
        await screenshot(page, "checkout-return-phone.png", full_page=True)
        assert page_errors == []


def resumed_from(request: SeenRequest) -> str | None:
    """The position a stream request resumes from (header or query), if any."""
    if "last-event-id" in request.headers:
        return request.headers["last-event-id"]
    query = parse_qs(urlsplit(request.target).query)
    return query["last_event_id"][0] if "last_event_id" in query else None


async def connection_state(page: Page) -> str:
    state: str = await page.locator("#connection").evaluate("(el) => el.dataset.state")
    return state


async def test_the_page_resumes_after_its_streams_are_cut_mid_provisioning(
    settings: Settings, page: Page, page_errors: list[str]
) -> None:
    admin = settings.provisioning_servers[0].dsn
    gated = GatedBackend(GraphBackend(admin), hold_after=["create_role", "apply_schema"])
    backends: list[Any] = [gated, SharedRepositoryBackend(admin)]
    async with (
        running_stack(settings, backends=backends) as stack,
        dropping_proxy(stack.url) as proxy,
    ):
        try:
            await page.goto(f"{proxy.url}/")
            await sign_in(page, stack.api_key)
            await page.locator(by_testid("no-subscriptions")).wait_for()
            await page.locator('#connection[data-state="live"]').wait_for()

            started = await stack.checkout("graph-standard", "resumed-graph")
            sub_id = started["subscription_id"]
            await stack.pay(started["checkout_session_id"])
            await gated.held_at("create_role")
            op_id = await operation_id_of(stack, sub_id)
            op_path = f"/v1/operations/{op_id}/events"
            log = by_testid(f"step-log-{op_id}")
            await page.locator(f'{log} > li[data-step="create_role"]').wait_for()
            midway = await bar_value(page, op_id)
            await wait_status(page, f"subscription-{sub_id}", "provisioning")
            await screenshot(page, "provisioning.png")
            last_seen = (await delivered_ids(page, op_path))[-1]

            # Every connection of the page is cut, and stays refused while two more steps run.
            assert proxy.drop(refuse=True) >= 2  # the user's stream and the operation's
            await page.locator(
                '#connection[data-state="reconnecting"], #connection[data-state="offline"]'
            ).wait_for()
            gated.release("create_role")
            await gated.held_at("apply_schema")
            seen_before = await step_log(page, op_id)
            assert seen_before[-1] == "create_role"
            assert "grant_access" not in seen_before
            await screenshot(page, "reconnecting.png")

            # Back online: the page catches up from where it was, then follows live.
            proxy.reopen()
            await page.locator(f'{log} > li[data-step="apply_schema"]').wait_for()
            await page.locator('#connection[data-state="live"]').wait_for()
            gated.release("apply_schema")
            await wait_status(page, f"operation-{op_id}", "completed")
            await wait_status(page, f"subscription-{sub_id}", "active")
        finally:
            gated.release_all()

        events = await server_events(stack, op_id)
        assert_every_step(await step_log(page, op_id), events, graph_steps(admin))
        held = next(e for e in events if e.data.get("step") == "create_role")
        assert 0 < held.data["progress"] < 100
        assert midway == (held.data["progress"], str(held.data["progress"]))
        assert await bar_value(page, op_id) == (100, "100")
        assert_whole_story(await delivered_ids(page, op_path), events)
        records = await spied_streams(page, op_path)
        assert sum(r["errors"] for r in records) >= 1
        assert sum(r["opens"] for r in records) >= 2
        # The browser asked to resume right after the last event it had, by Last-Event-ID.
        resumes = [resumed_from(r) for r in proxy.requests(op_path)]
        assert resumes[0] is None
        assert last_seen in resumes[1:]
        user_ids = await delivered_ids(page, "/v1/events")
        assert len(set(user_ids)) == len(user_ids)
        assert await connection_state(page) == "live"
        assert page_errors == []
