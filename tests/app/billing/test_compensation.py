"""Compensations are claimed: however many instances sweep, one Stripe call and one audit row."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial

import anyio
import pytest

from app.billing.compensation import BillingHooks
from app.billing.stripe.provider import StripePaymentProvider
from app.billing.subscriptions import queue_stripe_cancellation
from app.db import create_pool
from app.settings import Settings
from provisioning.leases import InstanceLock
from tests.support.stack import Stack, running_stack, wait_for

pytestmark = pytest.mark.anyio

PENDING = 12


@asynccontextmanager
async def other_instance(stack: Stack) -> AsyncIterator[BillingHooks]:
    """The billing hooks of another instance: a pool, a Stripe client and an instance lock of
    its own (its claims are alive while it holds the lock)."""
    assert stack.settings.database_url is not None
    pool = await create_pool(stack.settings.database_url, min_size=2, max_size=10)
    provider = StripePaymentProvider(
        stack.settings.stripe_api_key,
        environment=stack.settings.environment,
        api_base=stack.emulator_url,
    )
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(InstanceLock(pool, "other-instance").run)
            publisher = stack.app.state.services.publisher
            yield BillingHooks(pool, provider, publisher, instance_id="other-instance")
            tg.cancel_scope.cancel()
    finally:
        await provider.aclose()
        await pool.close()


async def failed_purchases(stack: Stack, count: int) -> dict[str, str]:
    """Paid subscriptions whose provisioning failed: the cancellation each one is owed, queued
    as `provisioning_failed` queues it; answers Stripe's subscription id by Lookout's."""
    owed: dict[str, str] = {}
    for number in range(count):
        # A customer each: one customer's open checkouts count against the plan's limit.
        _, key = await stack.new_user(f"owed-{number}@example.com")
        answer = await stack.anonymous.post(
            "/v1/checkout",
            json={"plan": "graph-standard", "resource_name": f"owed-{number}"},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert answer.status_code == 201, answer.text
        started = answer.json()
        paid = await stack.pay(started["checkout_session_id"], deliver_webhooks=False)
        owed[started["subscription_id"]] = paid["object"]["subscription"]
    async with stack.app.state.services.pool.acquire() as conn:
        for subscription_id, stripe_id in owed.items():
            await queue_stripe_cancellation(conn, subscription_id, stripe_id)
    return owed


async def test_two_instances_and_the_immediate_path_cancel_each_subscription_once(
    settings: Settings,
) -> None:
    async with running_stack(settings) as stack, AsyncExitStack() as instances:
        owed = await failed_purchases(stack, PENDING)
        # A slow Stripe (every cancel answers after 0.2 s) keeps each call in flight while
        # the others sweep: without a claim, each one calls for every row.
        fault = {"method": "DELETE", "path": "/v1/subscriptions/", "status": 200}
        await stack.emulator.post("/_emulator/faults", json={**fault, "count": 1000, "delay": 0.2})
        await stack.emulator.delete("/_emulator/requests")
        first = await instances.enter_async_context(other_instance(stack))
        second = await instances.enter_async_context(other_instance(stack))
        mine = stack.app.state.services.hooks

        async with anyio.create_task_group() as tg:
            for hooks in (first, second, mine):
                tg.start_soon(hooks.cancel_due)
            for number, subscription_id in enumerate(owed):
                immediate = (first, second)[number % 2]
                tg.start_soon(partial(immediate.cancel_due, subscription_id=subscription_id))
            # The sweeps that come late find the rows done or claimed, and call nobody.
            for hooks in (first, second):
                tg.start_soon(hooks.cancel_due)

        log = (await stack.emulator.get("/_emulator/requests?method=DELETE")).json()["data"]
        calls = Counter(r["path"].rsplit("/", 1)[-1] for r in log)
        assert calls == Counter(set(owed.values())), calls
        async with stack.app.state.services.pool.acquire() as conn:
            audited = await conn.fetch(
                "SELECT subject_id, count(*) AS n FROM audit_log"
                " WHERE kind = 'stripe.canceled' GROUP BY subject_id"
            )
            failures = await conn.fetchval(
                "SELECT count(*) FROM audit_log WHERE kind = 'stripe.cancel_failed'"
            )
            undone = await conn.fetchval(
                "SELECT count(*) FROM stripe_compensations WHERE done_at IS NULL"
            )
        assert {r["subject_id"]: r["n"] for r in audited} == dict.fromkeys(owed, 1)
        assert failures == 0
        assert undone == 0
        for stripe_id in owed.values():
            answer = await stack.emulator.get(
                f"/v1/subscriptions/{stripe_id}",
                headers={"Authorization": f"Bearer {stack.settings.stripe_api_key}"},
            )
            assert answer.json()["status"] == "canceled"


async def test_a_failed_call_is_retried_and_each_outcome_audited_once(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        fault = {"method": "DELETE", "path": "/v1/subscriptions/", "status": 500, "count": 100}
        await stack.emulator.post("/_emulator/faults", json=fault)
        owed = await failed_purchases(stack, 1)
        ((subscription_id, _),) = owed.items()
        hooks = stack.app.state.services.hooks
        pool = stack.app.state.services.pool

        async def audited(kind: str) -> bool:
            async with pool.acquire() as conn:
                found: bool = await conn.fetchval(
                    "SELECT exists(SELECT FROM audit_log WHERE subject_id = $1 AND kind = $2)",
                    subscription_id,
                    kind,
                )
            return found

        await hooks.cancel_due(subscription_id=subscription_id)
        await wait_for(partial(audited, "stripe.cancel_failed"), what="the failure audited")
        # Not due again until its backoff has passed: nothing is tried meanwhile.
        assert await hooks.cancel_due() == 0
        await stack.emulator.delete("/_emulator/faults")
        async with pool.acquire() as conn:
            await conn.execute(
                "UPDATE stripe_compensations SET next_attempt_at = now()"
                " WHERE subscription_id = $1",
                subscription_id,
            )
        await hooks.cancel_due()
        await wait_for(partial(audited, "stripe.canceled"), what="the cancellation audited")
        async with pool.acquire() as conn:
            kinds = await conn.fetch(
                "SELECT kind FROM audit_log WHERE subject_id = $1 AND kind LIKE 'stripe.cancel%'"
                " ORDER BY id",
                subscription_id,
            )
            row = await conn.fetchrow(
                "SELECT attempts, done_at, locked_until FROM stripe_compensations"
                " WHERE subscription_id = $1",
                subscription_id,
            )
        assert [k["kind"] for k in kinds] == ["stripe.cancel_failed", "stripe.canceled"]
        assert row is not None and row["attempts"] == 2
        assert row["done_at"] is not None and row["locked_until"] is None
