"""A burst of payment confirmations is fulfilled together, and each subscription exactly once."""

from __future__ import annotations

import contextlib
import copy
import json
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import anyio
import asyncpg
import httpx
import pytest

from app.settings import Settings
from streams import stream_key, user_topic
from tests.support.stack import Stack, running_stack, wait_for
from tests.support.stripe_events import deliver, make_event, stripe_object

pytestmark = pytest.mark.anyio


@dataclass(frozen=True)
class Customer:
    user_id: str
    http: httpx.AsyncClient  # signed in as this customer


@dataclass(frozen=True)
class Purchase:
    customer: Customer
    subscription_id: str
    completed: dict[str, Any]  # its checkout.session.completed, paid and not yet delivered


@contextlib.asynccontextmanager
async def customers(stack: Stack, count: int) -> AsyncIterator[list[Customer]]:
    async with contextlib.AsyncExitStack() as exits:
        found = []
        for n in range(count):
            user_id, key = await stack.new_user(f"burst-{n}@example.com")
            http = httpx.AsyncClient(
                base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
            )
            found.append(Customer(user_id, await exits.enter_async_context(http)))
        yield found


async def buy(stack: Stack, customer: Customer, name: str) -> Purchase:
    """Checks out a graph and pays for it in the emulator, which keeps its webhooks."""
    answer = await customer.http.post(
        "/v1/checkout", json={"plan": "graph-standard", "resource_name": name}
    )
    assert answer.status_code == 201, answer.text
    started = answer.json()
    completed = (await stack.paid_events(started["checkout_session_id"]))[
        "checkout.session.completed"
    ]
    assert completed["data"]["object"]["payment_status"] == "paid"
    return Purchase(customer, started["subscription_id"], completed)


async def deliver_together(stack: Stack, events: Sequence[dict[str, Any]]) -> None:
    answers: list[httpx.Response] = []

    async def one(event: dict[str, Any]) -> None:
        answers.append(
            await deliver(stack.anonymous, event, stack.settings.stripe_webhook_secrets[0])
        )

    async with anyio.create_task_group() as tg:
        for event in events:
            tg.start_soon(one, event)
    assert [a.status_code for a in answers] == [200] * len(events), [a.text for a in answers]


async def wait_active(purchase: Purchase) -> None:
    async def active() -> bool:
        answer = await purchase.customer.http.get(f"/v1/subscriptions/{purchase.subscription_id}")
        answer.raise_for_status()
        return bool(answer.json()["status"] == "active")

    await wait_for(active, within=60, what=f"{purchase.subscription_id} to be active")


async def settled_events(db: asyncpg.Connection, ids: set[str]) -> dict[str, str]:
    """Waits until the events `ids` are processed, or any event went wrong; answers the status
    of those events and of any that went wrong (the emulator delivers catalog events too)."""

    async def settled() -> dict[str, str] | None:
        rows = await db.fetch("SELECT id, status, last_error FROM webhook_events")
        found = {r["id"]: ": ".join(filter(None, [r["status"], r["last_error"]])) for r in rows}
        mine = {i: s for i, s in found.items() if i in ids}
        wrong = {i: s for i, s in found.items() if s.startswith(("failed", "retrying"))}
        done = set(mine) == ids and all(s == "processed" for s in mine.values())
        return mine | wrong if done or wrong else None

    return await wait_for(settled, what=f"events {sorted(ids)} to be processed")


async def provisions(db: asyncpg.Connection) -> dict[str, str]:
    """Each subscription's provision operation, checked to be unique and the one it points at."""
    ops = await db.fetch("SELECT subject_id, id FROM operations WHERE kind = 'provision'")
    subjects = [o["subject_id"] for o in ops]
    assert len(subjects) == len(set(subjects)), subjects
    pointed = await db.fetch("SELECT id, operation_id FROM subscriptions")
    assert {s["id"]: s["operation_id"] for s in pointed} == {o["subject_id"]: o["id"] for o in ops}
    return {o["subject_id"]: o["id"] for o in ops}


async def paid_audits(db: asyncpg.Connection) -> list[str]:
    rows = await db.fetch("SELECT subject_id FROM audit_log WHERE kind = 'subscription.paid'")
    return sorted(r["subject_id"] for r in rows)


async def user_stream(stack: Stack, user_id: str) -> list[tuple[str, dict[str, Any]]]:
    key = stream_key(stack.settings.redis_prefix, user_topic(user_id))
    raw = await stack.app.state.services.redis.xrange(key)
    entries = cast("list[tuple[bytes, dict[bytes, bytes]]]", raw)
    return [(fields[b"t"].decode(), json.loads(fields[b"d"])) for _, fields in entries]


@pytest.mark.timeout(120)
async def test_a_burst_of_confirmations_provisions_each_subscription_once(
    settings: Settings,
) -> None:
    async with running_stack(settings) as stack, customers(stack, 2) as people:
        # Two a customer: graph-standard allows three.
        bought = [await buy(stack, people[n % 2], f"burst-{n}") for n in range(4)]
        async_paid = make_event(
            "checkout.session.async_payment_succeeded",
            copy.deepcopy(bought[1].completed["data"]["object"]),
        )
        unknown = make_event(
            "checkout.session.completed",
            stripe_object(
                "checkout.session",
                id=f"cs_test_unknown_{secrets.token_hex(8)}",
                mode="subscription",
                status="complete",
                payment_status="paid",
                metadata={},
                client_reference_id=None,
            ),
        )
        completed = [p.completed for p in bought]
        await deliver_together(stack, [*completed, bought[0].completed, async_paid, unknown])

        for purchase in bought:
            await wait_active(purchase)
        sent = {e["id"] for e in [*completed, async_paid, unknown]}
        db = await asyncpg.connect(stack.settings.database_url)
        try:
            assert await settled_events(db, sent) == dict.fromkeys(sent, "processed")
            operations = await provisions(db)
            audited = await paid_audits(db)
        finally:
            await db.close()
        subscription_ids = sorted(p.subscription_id for p in bought)
        assert sorted(operations) == subscription_ids
        assert audited == subscription_ids

        for person in people:
            mine = {
                p.subscription_id: operations[p.subscription_id]
                for p in bought
                if p.customer is person
            }
            events = await user_stream(stack, person.user_id)
            started = [d["operation_id"] for t, d in events if t == "operation.started"]
            assert sorted(started) == sorted(mine.values())
            provisioning = {
                (d["subscription"]["id"], d["subscription"]["operation_id"])
                for t, d in events
                if t == "subscription.updated" and d["subscription"]["status"] == "provisioning"
            }
            assert set(mine.items()) <= provisioning, events


@pytest.mark.timeout(90)
async def test_one_confirmation_five_times_at_once_is_fulfilled_once(settings: Settings) -> None:
    async with running_stack(settings) as stack, customers(stack, 1) as people:
        purchase = await buy(stack, people[0], "repeated")
        await deliver_together(stack, [purchase.completed] * 5)

        await wait_active(purchase)
        db = await asyncpg.connect(stack.settings.database_url)
        try:
            event_id = purchase.completed["id"]
            assert await settled_events(db, {event_id}) == {event_id: "processed"}
            assert list(await provisions(db)) == [purchase.subscription_id]
            assert await paid_audits(db) == [purchase.subscription_id]
        finally:
            await db.close()
