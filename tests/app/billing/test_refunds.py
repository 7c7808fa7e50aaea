"""A failed provisioning gives the customer's money back, once: the Stripe subscription is
cancelled at once and the first invoice's payment refunded, each under one idempotency key,
whatever fails on the way (Stripe answering 500, a process killed between the refund and its
commit). And one Stripe Customer per user, whatever the number of purchases."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from httpx_sse import aconnect_sse

from app.billing.compensation import refund_key
from app.billing.subscriptions import queue_failed_provisioning_compensations
from app.settings import Settings
from provisioning import GraphBackend
from tests.app.billing.child_compensation import CHILD_INSTANCE
from tests.support.failing_backend import FailingBackend
from tests.support.process import clean_environment
from tests.support.stack import Stack, running_stack, wait_for

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[3]
GRAPH_STANDARD = 2900  # cents


def failing(settings: Settings) -> list[GraphBackend | FailingBackend]:
    assert settings.database_url is not None
    return [FailingBackend(GraphBackend(settings.database_url))]


async def stripe_get(stack: Stack, path: str, **params: Any) -> dict[str, Any]:
    """What the emulated Stripe answers, through its API (with the API key)."""
    answer = await stack.emulator.get(
        path,
        params=params,
        headers={"Authorization": f"Bearer {stack.settings.stripe_api_key}"},
    )
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def first_charge(stack: Stack, stripe_subscription_id: str) -> dict[str, Any]:
    """The charge that paid the subscription's first invoice, found as Stripe links it now:
    invoice → invoice_payment → PaymentIntent → latest charge."""
    sub = await stripe_get(stack, f"/v1/subscriptions/{stripe_subscription_id}")
    payments = await stripe_get(
        stack, "/v1/invoice_payments", invoice=sub["latest_invoice"], status="paid"
    )
    (payment,) = payments["data"]
    assert payment["payment"]["type"] == "payment_intent"
    pi = await stripe_get(stack, f"/v1/payment_intents/{payment['payment']['payment_intent']}")
    assert pi["status"] == "succeeded" and pi["amount_received"] == GRAPH_STANDARD
    return await stripe_get(stack, f"/v1/charges/{pi['latest_charge']}")


async def assert_refunded_once(stack: Stack, subscription_id: str) -> dict[str, Any]:
    """Stripe holds exactly one refund, of the whole charge, made under Lookout's key; the
    audit log says so once. Answers the refund."""
    async with stack.app.state.services.pool.acquire() as conn:
        stripe_id = await conn.fetchval(
            "SELECT stripe_subscription_id FROM subscriptions WHERE id = $1", subscription_id
        )
        audited = await conn.fetch(
            "SELECT detail FROM audit_log WHERE subject_id = $1 AND kind = 'stripe.refunded'",
            subscription_id,
        )
    charge = await first_charge(stack, stripe_id)
    assert charge["amount_refunded"] == charge["amount"] == GRAPH_STANDARD
    assert charge["refunded"] is True
    refunds = (await stripe_get(stack, "/v1/refunds", charge=charge["id"]))["data"]
    assert len(refunds) == 1, refunds
    (refund,) = refunds
    assert (refund["amount"], refund["currency"], refund["status"]) == (
        GRAPH_STANDARD,
        "usd",
        "succeeded",
    )
    made = [
        r
        for r in (
            await stack.emulator.get("/_emulator/requests?method=POST&path=/v1/refunds")
        ).json()["data"]
        if r["status"] == 200
    ]
    assert {r["idempotency_key"] for r in made} == {refund_key(subscription_id)}
    assert sum(not r["idempotent_replayed"] for r in made) == 1
    assert len(audited) == 1
    detail = json.loads(audited[0]["detail"])
    assert (detail["refund_id"], detail["amount"], detail["currency"]) == (
        refund["id"],
        GRAPH_STANDARD,
        "usd",
    )
    found: dict[str, Any] = refund
    return found


async def subscription_updates(stack: Stack, seen: list[dict[str, Any]]) -> None:
    """Collects the `subscription.updated` events of the user's live stream."""
    async with aconnect_sse(stack.http, "GET", "/v1/events") as source:
        async for sse in source.aiter_sse():
            if sse.event == "subscription.updated":
                seen.append(json.loads(sse.data)["subscription"])


async def test_a_failed_provisioning_is_cancelled_and_refunded_once_and_shown(
    settings: Settings,
) -> None:
    async with running_stack(settings, backends=failing(settings)) as stack:
        seen: list[dict[str, Any]] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(subscription_updates, stack, seen)
            await anyio.sleep(0.3)  # the stream is open (it asked for no history)
            started = await stack.checkout("graph-standard", "refunded")
            await stack.pay(started["checkout_session_id"])
            await stack.wait_for_status(started["subscription_id"], "failed")

            async def refunded() -> dict[str, Any] | None:
                found = await stack.subscription(started["subscription_id"])
                return found if found["refund"] else None

            shown = await wait_for(refunded, what="the refund on the subscription")

            async def streamed_refund() -> bool:
                return any(s["refund"] for s in seen)

            await wait_for(streamed_refund, what="the refund streamed")
            tg.cancel_scope.cancel()

        assert shown["refund"] == {
            "amount": GRAPH_STANDARD,
            "currency": "usd",
            "status": "succeeded",
        }
        streamed = [s for s in seen if s["id"] == shown["id"] and s["refund"]]
        assert streamed[-1]["refund"] == shown["refund"]
        await assert_refunded_once(stack, shown["id"])

        # Cancelled at once, not at the end of the period, under its own key.
        async with stack.app.state.services.pool.acquire() as conn:
            stripe_id = await conn.fetchval(
                "SELECT stripe_subscription_id FROM subscriptions WHERE id = $1", shown["id"]
            )
            kinds = Counter(
                r["kind"]
                for r in await conn.fetch(
                    "SELECT kind FROM audit_log WHERE subject_id = $1", shown["id"]
                )
            )
        assert (await stripe_get(stack, f"/v1/subscriptions/{stripe_id}"))["status"] == "canceled"
        assert kinds["stripe.canceled"] == 1 and kinds["stripe.refunded"] == 1
        assert kinds["stripe.refund_failed"] == 0

        # Stripe tells about the money coming back: each event once, delivered to Lookout.
        assert (await stack.emulator.post("/_emulator/webhooks/drain")).status_code == 200
        events = (await stack.emulator.get("/_emulator/events")).json()["data"]
        money = Counter(
            e["type"] for e in events if e["type"].startswith(("refund.", "charge.refund"))
        )
        assert money == {
            "refund.created": 1,
            "charge.refunded": 1,
            "refund.updated": 1,
            "charge.refund.updated": 1,
        }
        assert all(
            e["delivery"] == "delivered"
            for e in events
            if e["type"] in ("refund.created", "charge.refunded", "refund.updated")
        )


async def test_a_refund_that_stripe_fails_is_retried_by_the_sweep_and_made_once(
    settings: Settings,
) -> None:
    async with running_stack(settings, backends=failing(settings)) as stack:
        # Every refund request answers 500 (the SDK's own retries included) until cleared.
        fault = {"method": "POST", "path": "/v1/refunds", "status": 500, "count": 1000}
        await stack.emulator.post("/_emulator/faults", json=fault)
        started = await stack.checkout("graph-standard", "retried")
        await stack.pay(started["checkout_session_id"])
        await stack.wait_for_status(started["subscription_id"], "failed")
        pool = stack.app.state.services.pool

        async def audited(kind: str) -> bool:
            async with pool.acquire() as conn:
                found: bool = await conn.fetchval(
                    "SELECT exists(SELECT FROM audit_log WHERE subject_id = $1 AND kind = $2)",
                    started["subscription_id"],
                    kind,
                )
            return found

        await wait_for(lambda: audited("stripe.refund_failed"), what="the failure audited")
        assert (await stack.subscription(started["subscription_id"]))["refund"] is None
        await stack.emulator.delete("/_emulator/faults")
        async with pool.acquire() as conn:
            await conn.execute(
                "UPDATE stripe_compensations SET next_attempt_at = now()"
                " WHERE subscription_id = $1",
                started["subscription_id"],
            )
        await stack.app.state.services.hooks.cancel_due()
        await wait_for(lambda: audited("stripe.refunded"), what="the refund audited")
        await assert_refunded_once(stack, started["subscription_id"])
        shown = await stack.subscription(started["subscription_id"])
        assert shown["refund"] == {
            "amount": GRAPH_STANDARD,
            "currency": "usd",
            "status": "succeeded",
        }


async def test_a_process_killed_between_the_refund_and_its_commit_is_replayed(
    settings: Settings,
) -> None:
    async with running_stack(settings) as stack:
        # A paid purchase whose provisioning failed: the compensations it owes are queued,
        # and no instance of this stack performs them before the child has.
        started = await stack.checkout("graph-standard", "killed")
        paid = await stack.pay(started["checkout_session_id"], deliver_webhooks=False)
        subscription_id, stripe_id = started["subscription_id"], paid["object"]["subscription"]
        pool = stack.app.state.services.pool
        async with pool.acquire() as conn:
            await conn.execute(
                "UPDATE subscriptions SET status = 'failed', stripe_subscription_id = $2"
                " WHERE id = $1",
                subscription_id,
                stripe_id,
            )
            await queue_failed_provisioning_compensations(conn, subscription_id, stripe_id)

        env = clean_environment()
        command = [
            sys.executable,
            # As a module from the repository's root: run as a file, its directory would come
            # first on sys.path, and tests/app/billing/stripe/ would hide the Stripe SDK.
            "-m",
            "tests.app.billing.child_compensation",
            str(settings.database_url),
            str(settings.redis_url),
            stack.emulator_url,
            settings.stripe_api_key,
            subscription_id,
        ]
        async with await anyio.open_process(command, env=env, cwd=ROOT, stderr=None) as child:
            assert child.stdout is not None
            line = b""
            with anyio.fail_after(60):
                while not line.endswith(b"\n"):
                    line += await child.stdout.receive(1)
            assert line.split()[0] == b"REFUNDED", line
            os.kill(child.pid, signal.SIGKILL)  # Stripe refunded; the commit never comes
            assert await child.wait() == -signal.SIGKILL

        async with pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT done_at, locked_by, locked_until > now() + interval '60 seconds'"
                " AS claimed FROM stripe_compensations"
                " WHERE subscription_id = $1 AND action = 'refund'",
                subscription_id,
            )
        # The dead process's claim has minutes to run, but its instance lock went with its
        # connection (PostgreSQL notices the closed socket): it is taken up at once.
        assert row is not None and row["done_at"] is None and row["claimed"]
        assert row["locked_by"] == CHILD_INSTANCE
        hooks = stack.app.state.services.hooks
        with anyio.fail_after(30):  # LOCK_SECONDS is 180
            while True:
                await hooks.cancel_due(subscription_id=subscription_id)
                async with pool.acquire() as conn:
                    if await conn.fetchval(
                        "SELECT done_at IS NOT NULL FROM stripe_compensations"
                        " WHERE subscription_id = $1 AND action = 'refund'",
                        subscription_id,
                    ):
                        break
                await anyio.sleep(0.1)  # until PostgreSQL has ended the dead one's session
        refund = await assert_refunded_once(stack, subscription_id)
        replays = [
            r
            for r in (
                await stack.emulator.get("/_emulator/requests?method=POST&path=/v1/refunds")
            ).json()["data"]
            if r["idempotent_replayed"]
        ]
        assert len(replays) == 1  # the survivor's call was Stripe's replay of the dead one's
        shown = await stack.subscription(subscription_id)
        assert shown["refund"] == {
            "amount": refund["amount"],
            "currency": "usd",
            "status": "succeeded",
        }


async def test_a_refund_that_fails_later_is_shown_as_failed(settings: Settings) -> None:
    async with running_stack(settings, backends=failing(settings)) as stack:
        started = await stack.checkout("graph-standard", "bounced")
        await stack.pay(started["checkout_session_id"])
        subscription_id = started["subscription_id"]

        async def refund_status(status: str) -> dict[str, Any] | None:
            refund = (await stack.subscription(subscription_id))["refund"]
            return refund if refund and refund["status"] == status else None

        await wait_for(lambda: refund_status("succeeded"), what="the refund")
        (refund,) = (await stripe_get(stack, "/v1/refunds"))["data"]
        assert refund["metadata"]["lookout_subscription_id"] == subscription_id
        # The card was closed meanwhile: the bank sends the money back to Stripe.
        failed = await stack.emulator.post(f"/_emulator/refunds/{refund['id']}/fail", json={})
        assert failed.status_code == 200, failed.text
        assert [e["type"] for e in failed.json()["events"]] == [
            "refund.failed",
            "refund.updated",
            "charge.refund.updated",
        ]
        shown = await wait_for(lambda: refund_status("failed"), what="the failure shown")
        assert shown == {"amount": GRAPH_STANDARD, "currency": "usd", "status": "failed"}
        charge = await stripe_get(stack, f"/v1/charges/{refund['charge']}")
        assert (charge["amount_refunded"], charge["refunded"]) == (0, False)
        async with stack.app.state.services.pool.acquire() as conn:
            changes = await conn.fetchval(
                "SELECT count(*) FROM audit_log WHERE subject_id = $1"
                " AND kind = 'subscription.refund_changed' AND detail->>'status' = 'failed'",
                subscription_id,
            )
        assert changes == 1


async def test_a_checkout_whose_payment_failed_is_cancelled_and_not_refunded(
    settings: Settings,
) -> None:
    async with running_stack(settings) as stack:
        bounced = await stack.checkout("graph-standard", "bounced")
        session_id, subscription_id = bounced["checkout_session_id"], bounced["subscription_id"]
        await stack.emulator.post(
            f"/_emulator/checkout/{session_id}/pay", json={"async_payment": True}
        )
        await stack.emulator.post(
            f"/_emulator/checkout/{session_id}/async_payment", json={"succeeded": False}
        )
        await stack.wait_for_status(subscription_id, "failed")
        session = await stripe_get(stack, f"/v1/checkout/sessions/{session_id}")
        pool = stack.app.state.services.pool
        # What a failed subscription whose Stripe subscription still exists is owed (the
        # lifecycle queues it when it sees Stripe's `incomplete` subscription after the
        # failure; queued here so as not to depend on the order of the webhooks).
        async with pool.acquire() as conn:
            await queue_failed_provisioning_compensations(
                conn, subscription_id, session["subscription"]
            )
        await stack.app.state.services.hooks.cancel_due()
        async with pool.acquire() as conn:
            kinds = Counter(
                r["kind"]
                for r in await conn.fetch(
                    "SELECT kind FROM audit_log WHERE subject_id = $1", subscription_id
                )
            )
        assert kinds["stripe.refund_not_needed"] == 1 and kinds["stripe.refunded"] == 0
        assert kinds["stripe.canceled"] == 1
        assert (await stripe_get(stack, "/v1/refunds"))["data"] == []
        made = await stack.emulator.get("/_emulator/requests?method=POST&path=/v1/refunds")
        assert made.json()["data"] == []
        assert (await stack.subscription(subscription_id))["refund"] is None


async def customers_created(stack: Stack) -> int:
    events = (await stack.emulator.get("/_emulator/events")).json()["data"]
    return sum(e["type"] == "customer.created" for e in events)


async def test_every_purchase_of_a_user_names_the_same_stripe_customer(
    settings: Settings,
) -> None:
    async with running_stack(settings) as stack:
        first = await stack.checkout("graph-standard", "first")
        await stack.pay(first["checkout_session_id"])
        second = await stack.checkout("repository-reader", "second")
        await stack.pay(second["checkout_session_id"])
        sessions = [
            await stripe_get(stack, f"/v1/checkout/sessions/{s['checkout_session_id']}")
            for s in (first, second)
        ]
        customers = {s["customer"] for s in sessions}
        assert len(customers) == 1 and None not in customers
        (customer,) = customers
        subs = await stripe_get(stack, "/v1/subscriptions", customer=customer)
        assert len(subs["data"]) == 2
        assert await customers_created(stack) == 1
        async with stack.app.state.services.pool.acquire() as conn:
            stored = await conn.fetchval(
                "SELECT customer_id FROM stripe_customers WHERE user_id = $1", stack.user_id
            )
        assert stored == customer
        found = await stripe_get(stack, f"/v1/customers/{customer}")
        assert found["metadata"] == {"lookout_user_id": stack.user_id}


async def test_two_concurrent_checkouts_of_a_user_create_one_customer(
    settings: Settings,
) -> None:
    async with running_stack(settings) as stack:
        answers: list[httpx.Response] = []

        async def buy(plan: str, name: str) -> None:
            answers.append(
                await stack.http.post("/v1/checkout", json={"plan": plan, "resource_name": name})
            )

        # Within each plan's limit, so that all four go through.
        async with anyio.create_task_group() as tg:
            for number in range(4):
                plan = ("graph-standard", "repository-reader")[number % 2]
                tg.start_soon(buy, plan, f"together-{number}")
        assert [a.status_code for a in answers] == [201] * 4, [a.text for a in answers]
        customers = set()
        for answer in answers:
            session_id = answer.json()["checkout_session_id"]
            customers.add(
                (await stripe_get(stack, f"/v1/checkout/sessions/{session_id}"))["customer"]
            )
        assert len(customers) == 1 and None not in customers
        assert await customers_created(stack) == 1
        # However many asked Stripe at once, they asked under the user's one key.
        asked = await stack.emulator.get("/_emulator/requests?method=POST&path=/v1/customers")
        keys = {r["idempotency_key"] for r in asked.json()["data"]}
        assert keys == {f"lookout-customer-{stack.user_id}"}
