"""The webhook intake's group commit, with a handler double whose batch path breaks."""

from __future__ import annotations

import json
from collections.abc import Sequence

import anyio
import asyncpg
import pytest

from app.billing.inbox import Batch, InboxEvent, WebhookInbox
from app.billing.intake import IntakeNotRunning, WebhookIntake
from app.billing.webhook_receiver import parse_event
from app.db import Connection
from tests.support.stack import wait_for
from tests.support.stripe_events import make_event, stripe_object

pytestmark = pytest.mark.anyio


class BrokenBatchHandler:
    """Fails every batch; handles events one by one."""

    def __init__(self) -> None:
        self.batches = 0
        self.one_by_one: list[str] = []

    async def __call__(self, event: InboxEvent) -> None:
        self.one_by_one.append(event.id)

    def batchable(self, event: InboxEvent) -> bool:
        return True

    async def handle_many(self, conn: Connection, events: Sequence[InboxEvent]) -> Batch:
        if not events:
            return Batch()  # the intake warming its connections up
        self.batches += 1
        # Written in the group's transaction, then undone with it.
        await conn.execute("INSERT INTO audit_log (kind) VALUES ('half-done batch')")
        raise RuntimeError("the batch path is broken")


async def test_a_broken_batch_stores_every_event_and_handles_them_one_by_one(
    db_pool: asyncpg.Pool,
) -> None:
    handler = BrokenBatchHandler()
    inbox = WebhookInbox(db_pool, handler)
    intake = WebhookIntake(db_pool, inbox)
    events = [
        parse_event(json.dumps(make_event("invoice.paid", stripe_object("invoice"))))
        for _ in range(5)
    ]
    answers: dict[str, bool] = {}

    async def store(index: int) -> None:
        answers[f"{index}"] = await intake.store(events[index % len(events)])

    async with anyio.create_task_group() as tg:
        tg.start_soon(intake.run)
        tg.start_soon(inbox.run)
        await wait_for(lambda: _running(intake), within=5, what="the intake to run")
        async with anyio.create_task_group() as senders:
            for index in range(7):  # two of them are repeats
                senders.start_soon(store, index)
        assert sorted(answers.values()) == [False, False, True, True, True, True, True]
        assert handler.batches >= 1
        await wait_for(lambda: _all_processed(db_pool, 5), within=10, what="5 processed")
        tg.cancel_scope.cancel()
    async with db_pool.acquire() as conn:
        half_done = await conn.fetchval(
            "SELECT count(*) FROM audit_log WHERE kind = 'half-done batch'"
        )
    assert half_done == 0
    assert sorted(handler.one_by_one) == sorted(e.id for e in events)


async def test_storing_without_the_intake_running_is_refused(db_pool: asyncpg.Pool) -> None:
    handler = BrokenBatchHandler()
    intake = WebhookIntake(db_pool, WebhookInbox(db_pool, handler))
    event = parse_event(json.dumps(make_event("invoice.paid", {"id": "in_1"})))
    with pytest.raises(IntakeNotRunning):
        await intake.store(event)


class HeldBatchHandler:
    """Handles every event in the group's transaction, once `release` is set."""

    def __init__(self) -> None:
        self.holding = anyio.Event()
        self.release = anyio.Event()
        self.warm_ups = 0

    async def __call__(self, event: InboxEvent) -> None:
        raise AssertionError(f"{event.id} was left for the worker")

    def batchable(self, event: InboxEvent) -> bool:
        return True

    async def handle_many(self, conn: Connection, events: Sequence[InboxEvent]) -> Batch:
        if not events:
            self.warm_ups += 1
            return Batch()
        self.holding.set()
        await self.release.wait()
        return Batch(handled=frozenset(e.id for e in events))


async def test_the_intake_is_quiet_only_once_every_waiting_event_is_written(
    db_pool: asyncpg.Pool,
) -> None:
    handler = HeldBatchHandler()
    intake = WebhookIntake(db_pool, WebhookInbox(db_pool, handler))
    with anyio.fail_after(1):
        await intake.quiet()  # nothing waits
    event = parse_event(json.dumps(make_event("invoice.paid", stripe_object("invoice"))))
    quiet_at: list[float] = []

    async def wait_for_quiet() -> None:
        await intake.quiet()
        quiet_at.append(anyio.current_time())

    async with anyio.create_task_group() as tg:
        tg.start_soon(intake.run)
        await wait_for(lambda: _running(intake), within=5, what="the intake to run")
        tg.start_soon(intake.store, event)
        with anyio.fail_after(10):
            await handler.holding.wait()
        # Every connection the pool keeps ran the batch's statements before the first group.
        assert handler.warm_ups == db_pool.get_min_size()
        tg.start_soon(wait_for_quiet)
        await anyio.sleep(0.2)
        assert quiet_at == []  # the event is still being written
        handler.release.set()
        await wait_for(lambda: _quiet_after(quiet_at), within=5, what="the intake to be quiet")
        # By then the event is committed and handled.
        assert await _all_processed(db_pool, 1)
        tg.cancel_scope.cancel()


class StalledAnnouncementHandler:
    """Handles every event in the group's transaction; announcing them waits for `release`
    (as publishing to a Redis that does not answer would)."""

    def __init__(self) -> None:
        self.release = anyio.Event()
        self.announced: list[frozenset[str]] = []

    async def __call__(self, event: InboxEvent) -> None:
        raise AssertionError(f"{event.id} was left for the worker")

    def batchable(self, event: InboxEvent) -> bool:
        return True

    async def handle_many(self, conn: Connection, events: Sequence[InboxEvent]) -> Batch:
        handled = frozenset(e.id for e in events)

        async def announce() -> None:
            await self.release.wait()
            self.announced.append(handled)

        return Batch(handled, announce if events else None)


async def test_a_stalled_announcement_holds_up_no_webhook_and_keeps_the_order(
    db_pool: asyncpg.Pool,
) -> None:
    handler = StalledAnnouncementHandler()
    intake = WebhookIntake(db_pool, WebhookInbox(db_pool, handler))
    first, second = (
        parse_event(json.dumps(make_event("invoice.paid", stripe_object("invoice"))))
        for _ in range(2)
    )
    quiet = anyio.Event()

    async def wait_for_quiet() -> None:
        await intake.quiet()
        quiet.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(intake.run)
        await wait_for(lambda: _running(intake), within=5, what="the intake to run")
        with anyio.fail_after(10):
            # Each is answered, committed, though the first group's announcement is stuck.
            assert await intake.store(first) is True
            tg.start_soon(wait_for_quiet)
            assert await intake.store(second) is True
        assert await _all_processed(db_pool, 2)
        await anyio.sleep(0.1)
        assert not quiet.is_set() and handler.announced == []
        handler.release.set()
        with anyio.fail_after(10):
            await quiet.wait()
        tg.cancel_scope.cancel()
    assert handler.announced == [frozenset({first.id}), frozenset({second.id})]


async def _quiet_after(quiet_at: list[float]) -> bool:
    return bool(quiet_at)


async def _running(intake: WebhookIntake) -> bool:
    return intake.running


async def _all_processed(pool: asyncpg.Pool, count: int) -> bool:
    async with pool.acquire() as conn:
        statuses = [r["status"] for r in await conn.fetch("SELECT status FROM webhook_events")]
    return statuses == ["processed"] * count
