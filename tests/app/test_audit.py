"""A Stripe event handled is audited once, whoever writes it and whatever it names."""

from __future__ import annotations

import anyio
import asyncpg
import pytest

from app.audit import record_event_audit

pytestmark = pytest.mark.anyio


async def test_an_event_is_audited_once_by_writers_at_once_naming_other_subjects(
    db_pool: asyncpg.Pool,
) -> None:
    """Found by the 10-minute chaos soak: a `customer.subscription.deleted` audited twice, by
    two handlings of one event (a claim that lapsed under a slowed PostgreSQL) or by tries that
    named its subject differently."""
    written: list[bool] = []

    async def write(subject: str) -> None:
        async with db_pool.acquire() as conn:
            written.append(
                await record_event_audit(
                    conn,
                    "stripe.customer.subscription.deleted",
                    event_id="evt_once",
                    user_id=None,
                    subject_id=subject,
                    detail={"object_id": "sub_stripe"},
                )
            )

    async with anyio.create_task_group() as tg:
        for n in range(8):
            tg.start_soon(write, "sub_local" if n % 2 else "sub_stripe")
    async with db_pool.acquire() as conn:
        rows = await conn.fetch("SELECT kind, detail FROM audit_log")
    assert sorted(written) == [False] * 7 + [True]
    assert len(rows) == 1 and rows[0]["kind"] == "stripe.customer.subscription.deleted"
    # Another kind of row about the same event is not a repeat.
    async with db_pool.acquire() as conn:
        assert await record_event_audit(
            conn, "stripe.other", event_id="evt_once", user_id=None, subject_id=None, detail={}
        )


async def test_an_audit_not_waiting_for_the_flush_is_written_once_and_leaves_the_session_durable(
    db_pool: asyncpg.Pool,
) -> None:
    """`wait_for_flush=False` turns synchronous_commit off for its own transaction only: the
    connection goes back to the pool committing durably, as every other caller expects."""
    async with db_pool.acquire() as conn:
        first = await record_event_audit(
            conn,
            "stripe.invoice.created",
            event_id="evt_async",
            user_id=None,
            subject_id="in_1",
            detail={"object_id": "in_1"},
            wait_for_flush=False,
        )
        again = await record_event_audit(
            conn,
            "stripe.invoice.created",
            event_id="evt_async",
            user_id=None,
            subject_id="in_1",
            detail={"object_id": "in_1"},
            wait_for_flush=False,
        )
        setting = await conn.fetchval("SHOW synchronous_commit")
        rows = await conn.fetchval(
            "SELECT count(*) FROM audit_log WHERE detail->>'event_id' = 'evt_async'"
        )
    assert (first, again) == (True, False)
    assert rows == 1
    assert setting == "on"
