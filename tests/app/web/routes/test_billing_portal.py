"""The Customer Portal and invoices, on the emulator over real HTTP with signed webhooks:
a cancellation made in the portal (`cancel_at` only, as in flexible billing mode) is undone by
Reactivate; `POST /v1/billing/portal` opens the portal; `GET /v1/invoices` lists the user's
invoices and nobody else's; an invoice webhook reaches the user's stream as `invoice.updated`."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest
from httpx_sse import aconnect_sse

from app.settings import Settings
from tests.app.billing.test_lifecycle import wait_processed
from tests.support.stack import Stack, running_stack, wait_for

pytestmark = pytest.mark.anyio


async def active_graph(stack: Stack, name: str) -> str:
    started = await stack.checkout("graph-standard", name)
    await stack.pay(started["checkout_session_id"])
    await stack.wait_for_status(started["subscription_id"], "active")
    return str(started["subscription_id"])


async def stripe_subscription(stack: Stack, subscription_id: str) -> dict[str, Any]:
    """The emulator's subscription behind ours, as Stripe's API answers it."""
    async with stack.app.state.services.pool.acquire() as conn:
        stripe_id = await conn.fetchval(
            "SELECT stripe_subscription_id FROM subscriptions WHERE id = $1", subscription_id
        )
    answer = await stack.emulator.get(
        f"/v1/subscriptions/{stripe_id}",
        headers={"Authorization": f"Bearer {stack.settings.stripe_api_key}"},
    )
    assert answer.status_code == 200, answer.text
    found: dict[str, Any] = answer.json()
    return found


def iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def portal_url(stack: Stack) -> str:
    answer = await stack.http.post("/v1/billing/portal")
    assert answer.status_code == 201, answer.text
    url: str = answer.json()["url"]
    return url


async def test_reactivate_undoes_a_cancellation_made_in_the_portal(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        sub_id = await active_graph(stack, "portal-graph")
        url = await portal_url(stack)
        assert url.startswith(f"{stack.emulator_url}/p/session/")
        page = await stack.emulator.get(url)
        assert page.status_code == 200 and "Cancel subscription" in page.text
        # The way back is the dashboard, at LOOKOUT_PUBLIC_URL.
        assert f"href='{stack.url}/'" in page.text

        stripe_sub = await stripe_subscription(stack, sub_id)
        cancelled = await stack.emulator.post(
            f"{url}/subscriptions/{stripe_sub['id']}/cancel", follow_redirects=True
        )
        assert cancelled.status_code == 200
        stripe_sub = await stripe_subscription(stack, sub_id)
        end = stripe_sub["items"]["data"][0]["current_period_end"]
        assert (stripe_sub["cancel_at"], stripe_sub["cancel_at_period_end"]) == (end, False)

        async def cancelling() -> dict[str, Any] | None:
            found = await stack.subscription(sub_id)
            return found if found["cancel_at"] is not None else None

        # Lookout hears it by webhook: a cancellation is scheduled, for that date.
        seen = await wait_for(cancelling, what="the portal's cancellation to reach Lookout")
        assert seen["cancel_at_period_end"] is True
        assert seen["cancel_at"] == iso(end)
        assert seen["status"] == "active"

        await stack.emulator.delete("/_emulator/requests")
        reactivated = await stack.http.post(f"/v1/subscriptions/{sub_id}/reactivate")
        assert reactivated.status_code == 200, reactivated.text
        assert reactivated.json()["cancel_at_period_end"] is False
        assert reactivated.json()["cancel_at"] is None
        stripe_sub = await stripe_subscription(stack, sub_id)
        assert (stripe_sub["cancel_at"], stripe_sub["cancel_at_period_end"]) == (None, False)
        # One parameter per request, as Stripe takes them; each with its own idempotency key.
        requests = (
            await stack.emulator.get(
                "/_emulator/requests",
                params={"method": "POST", "path": f"/v1/subscriptions/{stripe_sub['id']}"},
            )
        ).json()["data"]
        assert [r["params"] for r in requests] == [
            {"cancel_at_period_end": "false"},
            {"cancel_at": ""},
        ]
        assert len({r["idempotency_key"] for r in requests}) == 2

        # The webhooks of both changes, processed: nothing is scheduled still.
        await stack.emulator.post("/_emulator/webhooks/drain", json={})
        await wait_processed(stack)
        final = await stack.subscription(sub_id)
        assert (final["cancel_at_period_end"], final["cancel_at"]) == (False, None)


async def test_the_portal_needs_a_billing_account_first(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        answer = await stack.http.post("/v1/billing/portal")
        assert answer.status_code == 409
        error = answer.json()["error"]
        assert error["code"] == "no_billing_account"
        assert "subscribe" in error["message"]
        assert (await stack.anonymous.post("/v1/billing/portal")).status_code == 401


async def test_invoices_are_the_users_own(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        assert (await stack.http.get("/v1/invoices")).json() == {"data": []}
        mine = await active_graph(stack, "billed-graph")
        _, other_key = await stack.new_user("other@example.com")
        own_key = stack.http.headers["Authorization"]
        stack.http.headers["Authorization"] = f"Bearer {other_key}"
        theirs = await active_graph(stack, "their-graph")
        their_invoices = (await stack.http.get("/v1/invoices")).json()["data"]
        stack.http.headers["Authorization"] = own_key

        answer = await stack.http.get("/v1/invoices")
        assert answer.status_code == 200
        (invoice,) = answer.json()["data"]
        assert set(invoice) == {
            "id", "number", "status", "amount_due", "amount_paid", "currency", "period_start",
            "period_end", "hosted_invoice_url", "subscription_id",
        }  # fmt: skip
        assert invoice["subscription_id"] == mine
        assert (invoice["status"], invoice["amount_due"], invoice["amount_paid"]) == (
            "paid",
            2900,
            2900,
        )
        assert invoice["currency"] == "usd"
        assert re.fullmatch(r"LOOKOUT-\d{4}", invoice["number"])
        period_end = (await stack.subscription(mine))["current_period_end"]
        assert invoice["period_end"] == period_end
        assert invoice["period_start"] < invoice["period_end"]
        hosted = await stack.emulator.get(invoice["hosted_invoice_url"])
        assert hosted.status_code == 200 and invoice["number"] in hosted.text

        assert [i["subscription_id"] for i in their_invoices] == [theirs]
        assert invoice["id"] not in {i["id"] for i in their_invoices}


async def test_an_invoice_webhook_reaches_the_users_stream_as_invoice_updated(
    settings: Settings,
) -> None:
    async with running_stack(settings) as stack:
        sub_id = await active_graph(stack, "renewing-graph")
        await wait_processed(stack)
        first = (await stack.http.get("/v1/invoices")).json()["data"]  # now cached
        assert len(first) == 1
        stripe_id = (await stripe_subscription(stack, sub_id))["id"]
        seen: list[dict[str, Any]] = []
        ready = anyio.Event()
        renewal: dict[str, Any] = {}

        async def listen() -> None:
            async with aconnect_sse(stack.http, "GET", "/v1/events") as source:
                ready.set()
                async for sse in source.aiter_sse():
                    if sse.event == "invoice.updated":
                        data = json.loads(sse.data)
                        seen.append(data)
                        if data["invoice"]["status"] == "paid":
                            return

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(listen)
                await ready.wait()
                await anyio.sleep(0.2)
                renewed = await stack.emulator.post(
                    f"/_emulator/subscriptions/{stripe_id}/renew", json={"outcome": "paid"}
                )
                renewal.update(renewed.json()["object"])

        last = seen[-1]
        assert last["type"] == "invoice.updated"
        assert last["subscription_id"] == sub_id
        assert datetime.fromisoformat(last["ts"]).tzinfo is not None
        assert last["invoice"]["id"] == renewal["latest_invoice"]
        listed = (await stack.http.get("/v1/invoices")).json()["data"]
        # The webhook dropped the cached list: the renewal's invoice is there, newest first,
        # exactly as the event carried it.
        assert [i["id"] for i in listed] == [renewal["latest_invoice"], first[0]["id"]]
        assert listed[0] == last["invoice"]
