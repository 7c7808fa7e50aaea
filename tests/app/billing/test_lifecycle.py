"""The subscription lifecycle driven by Stripe's events, in any order, and by the customer."""

from __future__ import annotations

import itertools
from typing import Any

import asyncpg
import pytest

from app.settings import Settings
from tests.support.stack import Stack, running_stack, wait_for
from tests.support.stripe_events import deliver

pytestmark = pytest.mark.anyio

SEQUENCE = (
    "checkout.session.completed",
    "customer.subscription.created",
    "invoice.paid",
    "invoice.payment_succeeded",
)


async def wait_processed(stack: Stack) -> None:
    pool = stack.app.state.services.pool

    async def idle() -> bool:
        async with pool.acquire() as conn:
            waiting: int = await conn.fetchval(
                "SELECT count(*) FROM webhook_events WHERE status <> 'processed'"
            )
        return waiting == 0

    await wait_for(idle, what="the inbox to be processed")


async def active_graph(stack: Stack, name: str) -> str:
    """A graph-standard subscription, paid for and provisioned; answers its id."""
    started = await stack.checkout("graph-standard", name)
    await stack.pay(started["checkout_session_id"])
    await stack.wait_for_status(started["subscription_id"], "active")
    return str(started["subscription_id"])


def comparable(subscription: dict[str, Any]) -> dict[str, Any]:
    keep = ("status", "plan", "cancel_at_period_end", "resource_type")
    return {k: subscription[k] for k in keep} | {
        "has_period_end": subscription["current_period_end"] is not None
    }


async def test_every_order_of_a_purchase_ends_in_the_same_state(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        finals = []
        for number, order in enumerate(itertools.permutations(SEQUENCE)):
            _, key = await stack.new_user(f"order-{number}@example.com")
            stack.http.headers["Authorization"] = f"Bearer {key}"
            started = await stack.checkout("graph-standard", f"perm-{number}")
            events = await stack.paid_events(started["checkout_session_id"])
            for event_type in order:
                answer = await deliver(
                    stack.anonymous, events[event_type], stack.settings.stripe_webhook_secrets[0]
                )
                assert answer.status_code == 200
            await stack.wait_for_status(started["subscription_id"], "active")
            await wait_processed(stack)
            finals.append(comparable(await stack.subscription(started["subscription_id"])))
        assert len(finals) == 24
        assert all(f == finals[0] for f in finals), finals
        assert finals[0]["status"] == "active"
        assert finals[0]["has_period_end"] is True


async def test_an_older_event_does_not_overwrite_a_newer_state(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        started = await stack.checkout("graph-standard", "ordering")
        await stack.pay(started["checkout_session_id"])
        active = await stack.wait_for_status(started["subscription_id"], "active")
        async with stack.app.state.services.pool.acquire() as conn:
            stripe_id = await conn.fetchval(
                "SELECT stripe_subscription_id FROM subscriptions WHERE id = $1", active["id"]
            )
        # The customer cancels in the portal; then Stripe redelivers the old "created" event.
        await stack.emulator.post(f"/_emulator/subscriptions/{stripe_id}/portal_cancel", json={})
        await wait_for(lambda: _cancel_flag(stack, active["id"], True), what="cancel_at_period_end")
        events = (await stack.emulator.get("/_emulator/events")).json()["data"]
        created = next(e for e in events if e["type"] == "customer.subscription.created")
        await stack.emulator.post(f"/_emulator/events/{created['id']}/deliver")
        await wait_processed(stack)
        after = await stack.subscription(active["id"])
        assert after["cancel_at_period_end"] is True
        assert after["status"] == "active"


async def _cancel_flag(stack: Stack, subscription_id: str, value: bool) -> bool:
    return (await stack.subscription(subscription_id))["cancel_at_period_end"] is value


async def stripe_subscription_id(stack: Stack, subscription_id: str) -> str:
    async with stack.app.state.services.pool.acquire() as conn:
        found: str = await conn.fetchval(
            "SELECT stripe_subscription_id FROM subscriptions WHERE id = $1", subscription_id
        )
        return found


async def test_stripe_events_move_the_status_as_described(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        sub_id = await active_graph(stack, "moves")
        stripe_id = await stripe_subscription_id(stack, sub_id)
        control = f"/_emulator/subscriptions/{stripe_id}"

        await stack.emulator.post(f"{control}/renew", json={"outcome": "failed"})
        await stack.wait_for_status(sub_id, "past_due")
        await stack.emulator.post(f"{control}/pay_invoice", json={})
        await stack.wait_for_status(sub_id, "active")
        # Stripe makes a subscription unpaid only once the retries of a past_due one ran out.
        refused = await stack.emulator.post(f"{control}/status", json={"status": "unpaid"})
        assert refused.status_code == 400
        await stack.emulator.post(f"{control}/renew", json={"outcome": "failed"})
        await stack.wait_for_status(sub_id, "past_due")
        await stack.emulator.post(f"{control}/status", json={"status": "unpaid"})
        await stack.wait_for_status(sub_id, "unpaid")
        await stack.emulator.post(f"{control}/pay_invoice", json={})
        await stack.wait_for_status(sub_id, "active")
        await stack.emulator.post(f"{control}/status", json={"status": "paused"})
        await stack.wait_for_status(sub_id, "paused")
        await stack.emulator.post(f"{control}/status", json={"status": "active"})
        await stack.wait_for_status(sub_id, "active")

        await stack.emulator.post(f"{control}/portal_cancel", json={})
        await wait_for(lambda: _cancel_flag(stack, sub_id, True), what="portal cancellation")
        await stack.emulator.post(f"{control}/portal_reactivate", json={})
        await wait_for(lambda: _cancel_flag(stack, sub_id, False), what="portal reactivation")

        customer = (
            await stack.emulator.get(
                f"/v1/subscriptions/{stripe_id}",
                headers={"Authorization": f"Bearer {stack.settings.stripe_api_key}"},
            )
        ).json()
        await stack.emulator.post(f"/_emulator/customers/{customer['customer']}/payment_method")

        async def has_payment_method() -> bool:
            async with stack.app.state.services.pool.acquire() as conn:
                found: bool = await conn.fetchval(
                    "SELECT has_payment_method FROM subscriptions WHERE id = $1", sub_id
                )
            return found

        await wait_for(has_payment_method, what="setup_intent.succeeded to be recorded")

        # Cancelled at once in Stripe: canceled here, and the graph's database is dropped.
        resource_id = (await stack.subscription(sub_id))["resource_id"]
        await stack.emulator.post(f"{control}/portal_cancel", json={"at_period_end": False})
        await stack.wait_for_status(sub_id, "canceled")
        await wait_for(
            lambda: _database_gone(stack, resource_id), what="the graph's database to be dropped"
        )


async def test_a_cancellation_at_period_end_keeps_the_graph_until_the_period_ends(
    settings: Settings,
) -> None:
    async with running_stack(settings) as stack:
        sub_id = await active_graph(stack, "until-the-end")
        resource_id = (await stack.subscription(sub_id))["resource_id"]

        cancelled = await stack.http.post(f"/v1/subscriptions/{sub_id}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        await wait_for(lambda: _cancel_flag(stack, sub_id, True), what="the cancellation")
        await wait_processed(stack)
        # Paid for until the period ends: still active, the database still there.
        assert (await stack.subscription(sub_id))["status"] == "active"
        assert not await _database_gone(stack, resource_id)

        stripe_id = await stripe_subscription_id(stack, sub_id)
        await stack.emulator.post(f"/_emulator/subscriptions/{stripe_id}/renew", json={})
        await stack.wait_for_status(sub_id, "canceled")

        async def deprovisioned() -> asyncpg.Record | None:
            async with stack.app.state.services.pool.acquire() as conn:
                found: asyncpg.Record | None = await conn.fetchrow(
                    "SELECT status, completed_steps FROM operations"
                    " WHERE subject_id = $1 AND kind = 'deprovision' AND status = 'completed'",
                    sub_id,
                )
            return found

        deprovision = await wait_for(deprovisioned, what="the deprovision to complete")
        assert deprovision["completed_steps"] == ["revoke_access", "drop_database", "drop_role"]
        assert await _database_gone(stack, resource_id)


async def _database_gone(stack: Stack, resource_id: str) -> bool:
    admin = await asyncpg.connect(stack.settings.database_url)
    try:
        exists = await admin.fetchval(
            "SELECT 1 FROM pg_database WHERE datname = $1", f"lookout_{resource_id}"
        )
    finally:
        await admin.close()
    return exists is None


async def test_checkout_expiry_and_async_payments(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        expiring = await stack.checkout("graph-standard", "expiring")
        await stack.emulator.post(f"/_emulator/checkout/{expiring['checkout_session_id']}/expire")
        await stack.wait_for_status(expiring["subscription_id"], "expired")

        slow = await stack.checkout("graph-standard", "slow-bank")
        await stack.emulator.post(
            f"/_emulator/checkout/{slow['checkout_session_id']}/pay", json={"async_payment": True}
        )
        await wait_processed(stack)
        assert (await stack.subscription(slow["subscription_id"]))["status"] == "pending_payment"
        await stack.emulator.post(
            f"/_emulator/checkout/{slow['checkout_session_id']}/async_payment",
            json={"succeeded": True},
        )
        await stack.wait_for_status(slow["subscription_id"], "active")

        bounced = await stack.checkout("graph-standard", "bounced")
        await stack.emulator.post(
            f"/_emulator/checkout/{bounced['checkout_session_id']}/pay",
            json={"async_payment": True},
        )
        await stack.emulator.post(
            f"/_emulator/checkout/{bounced['checkout_session_id']}/async_payment",
            json={"succeeded": False},
        )
        await stack.wait_for_status(bounced["subscription_id"], "failed")


async def test_the_return_page_moves_forward_when_the_webhook_is_late(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        started = await stack.checkout("graph-standard", "late-hook")
        session_id = started["checkout_session_id"]
        before = (await stack.http.get(f"/v1/checkout/{session_id}")).json()
        assert before["status"] == "pending_payment"
        assert before["operation_id"] is None
        assert before["events_url"] == f"{stack.url}/v1/events"

        events = await stack.paid_events(session_id)
        answer = (await stack.http.get(f"/v1/checkout/{session_id}")).json()
        assert answer["status"] in ("provisioning", "active")
        assert answer["operation_id"]
        assert answer["events_url"] == f"{stack.url}/v1/operations/{answer['operation_id']}/events"
        await stack.wait_for_status(started["subscription_id"], "active")

        # The webhook comes at last: nothing moves backwards, nothing starts twice.
        for event in events.values():
            await deliver(stack.anonymous, event, stack.settings.stripe_webhook_secrets[0])
        await wait_processed(stack)
        final = await stack.subscription(started["subscription_id"])
        assert final["status"] == "active"
        assert final["operation_id"] == answer["operation_id"]
        again = (await stack.http.get(f"/v1/checkout/{session_id}")).json()
        assert again["status"] == "active"


async def test_cancel_and_reactivate_reach_stripe_with_idempotency_keys(
    settings: Settings,
) -> None:
    async with running_stack(settings) as stack:
        sub_id = await active_graph(stack, "toggle")
        stripe_id = await stripe_subscription_id(stack, sub_id)
        await stack.emulator.delete("/_emulator/requests")

        cancelled = await stack.http.post(f"/v1/subscriptions/{sub_id}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["cancel_at_period_end"] is True
        reactivated = await stack.http.post(f"/v1/subscriptions/{sub_id}/reactivate")
        assert reactivated.json()["cancel_at_period_end"] is False
        await stack.http.post(f"/v1/subscriptions/{sub_id}/cancel")

        requests = (
            await stack.emulator.get(
                "/_emulator/requests",
                params={"method": "POST", "path": f"/v1/subscriptions/{stripe_id}"},
            )
        ).json()["data"]
        assert len(requests) == 3
        keys = [r["idempotency_key"] for r in requests]
        assert all(keys)
        assert len(set(keys)) == 3
        assert [r["params"]["cancel_at_period_end"] for r in requests] == ["true", "false", "true"]

        _, other_key = await stack.new_user("mallory@example.com")
        stack.http.headers["Authorization"] = f"Bearer {other_key}"
        assert (await stack.http.post(f"/v1/subscriptions/{sub_id}/cancel")).status_code == 404
        assert (await stack.http.get(f"/v1/subscriptions/{sub_id}")).status_code == 404


async def test_cancel_of_a_subscription_stripe_does_not_know_says_so_and_is_not_an_outage(
    settings: Settings,
) -> None:
    """As after a demo whose emulator forgot its state: a "No such subscription" from Stripe
    is a 409 naming what is wrong, not a 503 that asks to try again."""
    async with running_stack(settings) as stack:
        sub_id = await active_graph(stack, "forgotten")
        async with stack.app.state.services.pool.acquire() as conn:
            await conn.execute(
                "UPDATE subscriptions SET stripe_subscription_id = 'sub_unknownToStripe'"
                " WHERE id = $1",
                sub_id,
            )
        for action in ("cancel", "reactivate"):
            answer = await stack.http.post(f"/v1/subscriptions/{sub_id}/{action}")
            if action == "reactivate":
                # Not cancelled in Lookout: nothing to ask Stripe.
                assert answer.status_code == 200, answer.text
                continue
            assert answer.status_code == 409, answer.text
            error = answer.json()["error"]
            assert error["code"] == "unknown_to_stripe"
            assert "no record of this subscription" in error["message"]
            assert "Try again" not in error["message"]
            assert "Retry-After" not in answer.headers
        after = await stack.subscription(sub_id)
        assert after["cancel_at_period_end"] is False
        assert after["status"] == "active"


async def test_an_event_retried_while_stripe_fails_is_audited_once(settings: Settings) -> None:
    """Found by the chaos soak: the handled-event audit row was written before the handler
    ran, so each try of an event while Stripe answered 500 left one more row."""
    async with running_stack(settings) as stack:
        sub_id = await active_graph(stack, "audited-once")
        stripe_id = await stripe_subscription_id(stack, sub_id)
        await wait_processed(stack)
        # Every read of the subscription from Stripe fails, for a while: the SDK's own retries
        # and the inbox's first tries each take one.
        fault = {"method": "GET", "path": f"/v1/subscriptions/{stripe_id}", "count": 8}
        assert (await stack.emulator.post("/_emulator/faults", json=fault)).status_code == 200
        await stack.emulator.post(f"/_emulator/subscriptions/{stripe_id}/portal_cancel", json={})
        await wait_for(lambda: _cancel_flag(stack, sub_id, True), within=45, what="the cancel")
        await wait_processed(stack)
        async with stack.app.state.services.pool.acquire() as conn:
            tries = await conn.fetchval(
                "SELECT max(attempts) FROM webhook_events WHERE type = $1",
                "customer.subscription.updated",
            )
            rows = await conn.fetch(
                "SELECT detail->>'event_id' AS event_id, count(*) AS n FROM audit_log"
                " WHERE kind LIKE 'stripe.%' AND detail ? 'event_id' GROUP BY 1"
            )
            events = await conn.fetch("SELECT id FROM webhook_events")
        assert tries >= 2  # the handler really failed and was tried again
        assert {r["event_id"]: r["n"] for r in rows} == {e["id"]: 1 for e in events}
