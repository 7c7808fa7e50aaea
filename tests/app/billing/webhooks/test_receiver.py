"""Storing webhook events: two instances storing the same redeliveries at once."""

from __future__ import annotations

import json

import anyio
import asyncpg
import pytest

from app.billing.webhooks.receiver import VerifiedEvent, parse_event, store_events
from tests.support.stripe_events import make_event, stripe_object

pytestmark = pytest.mark.anyio


def _events(count: int) -> list[VerifiedEvent]:
    return [
        parse_event(json.dumps(make_event("invoice.paid", stripe_object("invoice"))))
        for _ in range(count)
    ]


async def test_two_instances_storing_the_same_events_in_opposite_orders_never_deadlock(
    database_url: str,
) -> None:
    # Two pools: two instances of Lookout, each writing a group in one transaction (as the
    # intake does when it fulfils payments), the groups overlapping in opposite orders.
    pools = [await asyncpg.create_pool(database_url, min_size=1, max_size=1) for _ in range(2)]
    deadlocks: list[BaseException] = []
    stored: list[set[str]] = []

    async def write(pool: asyncpg.Pool, events: list[VerifiedEvent], go: anyio.Event) -> None:
        async with pool.acquire() as conn:
            await conn.execute("SELECT 1")  # connected before the race starts
            await go.wait()
            try:
                async with conn.transaction():
                    stored.append(await store_events(conn, events))
                    # Held a moment, as a group's fulfilment holds its transaction.
                    await conn.execute("SELECT pg_sleep(0.01)")
            except asyncpg.DeadlockDetectedError as exc:
                deadlocks.append(exc)

    try:
        for _ in range(20):
            events = _events(40)
            go = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(write, pools[0], events, go)
                tg.start_soon(write, pools[1], events[::-1], go)
                await anyio.sleep(0.01)
                go.set()
            assert deadlocks == []
            # Each id new to exactly one of the two writers.
            first, second = stored[-2:]
            assert first | second == {e.id for e in events} and not first & second
    finally:
        for pool in pools:
            await pool.close()
