"""The webhook intake's group commit, with handler doubles; cancelled and stalled writes held
by real row locks in PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Sequence

import anyio
import asyncpg
import pytest

from app.billing.webhooks.inbox import Batch, InboxEvent, WebhookInbox
from app.billing.webhooks.intake import EventNotStored, IntakeFull, IntakeNotRunning, WebhookIntake
from app.billing.webhooks.receiver import VerifiedEvent, parse_event
from app.db import Connection
from bench.chaos.proxy import fault_proxy, url_through
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


async def test_a_connection_cut_right_after_its_commit_answers_once_and_announces_the_group(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The group's transaction commits, then its connection is cut as asyncpg resets it on
    the way back to the pool (asyncpg's default reset talks to the server): the write
    committed, so its requests are answered as written, the group announced once, nothing
    stored twice or left to the worker."""
    async with fault_proxy("postgres", database_url) as proxy:
        pool = await asyncpg.create_pool(
            url_through(database_url, proxy.port), min_size=1, max_size=4
        )
        try:
            handler = StalledAnnouncementHandler()
            handler.release.set()
            intake = WebhookIntake(pool, WebhookInbox(pool, handler))
            event = _invoice_paid()
            answers: list[bool] = []

            async def deliver() -> None:
                answers.append(await intake.store(event))

            async with anyio.create_task_group() as tg:
                tg.start_soon(intake.run)
                await wait_for(lambda: _running(intake), within=5, what="the intake to run")
                cut = proxy.cut_after_commit(event.id.encode())
                with anyio.fail_after(10):
                    async with anyio.create_task_group() as senders:
                        for _ in range(2):  # Stripe's delivery and a redelivery, together
                            senders.start_soon(deliver)
                with anyio.fail_after(10):
                    await cut.wait()
                await wait_for(lambda: _announced(handler, 1), within=10, what="the announcement")
                await anyio.sleep(0.1)  # nor is anything announced a second time
                tg.cancel_scope.cancel()
            assert sorted(answers) == [False, True]
            assert handler.announced == [frozenset({event.id})]
            assert await _all_processed(pool, 1)
            assert "committed; its connection then failed" in caplog.text
            assert "not handled together" not in caplog.text
        finally:
            await pool.close()


async def _quiet_after(quiet_at: list[float]) -> bool:
    return bool(quiet_at)


async def _running(intake: WebhookIntake) -> bool:
    return intake.running


async def _all_processed(pool: asyncpg.Pool, count: int) -> bool:
    async with pool.acquire() as conn:
        statuses = [r["status"] for r in await conn.fetch("SELECT status FROM webhook_events")]
    return statuses == ["processed"] * count


class NothingToBatch:
    """Leaves every event to the worker, which handles it."""

    def __init__(self) -> None:
        self.handled: list[str] = []

    async def __call__(self, event: InboxEvent) -> None:
        self.handled.append(event.id)

    def batchable(self, event: InboxEvent) -> bool:
        return False

    async def handle_many(self, conn: Connection, events: Sequence[InboxEvent]) -> Batch:
        return Batch()


def _invoice_paid() -> VerifiedEvent:
    return parse_event(json.dumps(make_event("invoice.paid", stripe_object("invoice"))))


async def _hold(database_url: str, event_id: str) -> asyncpg.Connection:
    """A connection whose open transaction inserted `event_id`: the intake's INSERT of the same
    id waits for it to end (a slow or stuck writer elsewhere, in effect)."""
    conn = await asyncpg.connect(database_url)
    await conn.execute("BEGIN")
    await conn.execute(
        "INSERT INTO webhook_events (id, type, stripe_created, payload)"
        " VALUES ($1, 'held', now(), '{}')",
        event_id,
    )
    return conn


async def _blocked_on_a_lock(pool: asyncpg.Pool) -> bool:
    # Not on the holding connection: within its transaction pg_stat_activity is one snapshot.
    waiting: int = await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO webhook_events%'"
    )
    return waiting > 0


async def _stored(pool: asyncpg.Pool, event_id: str) -> int:
    async with pool.acquire() as conn:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM webhook_events WHERE id = $1", event_id
        )
        return count


async def test_a_write_cancelled_midway_is_not_acknowledged_and_the_redelivery_is_stored_once(
    db_pool: asyncpg.Pool, database_url: str
) -> None:
    intake = WebhookIntake(db_pool, WebhookInbox(db_pool, NothingToBatch()))
    event = _invoice_paid()
    held = await _hold(database_url, event.id)
    answers: list[bool | Exception] = []

    async def deliver() -> None:
        try:
            answers.append(await intake.store(event))
        except EventNotStored as exc:
            answers.append(exc)

    try:
        async with anyio.create_task_group() as tg:
            intake_scope = anyio.CancelScope()

            async def run_intake() -> None:
                with intake_scope:
                    await intake.run()

            tg.start_soon(run_intake)
            await wait_for(lambda: _running(intake), within=5, what="the intake to run")
            tg.start_soon(deliver)
            await wait_for(lambda: _blocked_on_a_lock(db_pool), within=10, what="the write to wait")
            intake_scope.cancel()  # the server shuts down, or the writer's task is restarted
            await wait_for(lambda: _answered(answers), within=10, what="the request's answer")
        # Never "stored" (no 2xx, duplicate or not) for a write that did not commit.
        assert len(answers) == 1 and isinstance(answers[0], EventNotStored), answers
    finally:
        await held.execute("ROLLBACK")  # the other writer gives up: the row was never stored
        await held.close()
    assert await _stored(db_pool, event.id) == 0

    # Stripe delivers it again, to a running intake: stored once, as new.
    async with anyio.create_task_group() as tg:
        tg.start_soon(intake.run)
        await wait_for(lambda: _running(intake), within=5, what="the intake to run again")
        with anyio.fail_after(10):
            assert await intake.store(event) is True
            assert await intake.store(event) is False
        tg.cancel_scope.cancel()
    assert await _stored(db_pool, event.id) == 1


async def test_a_stuck_group_holds_up_no_other_webhook_and_is_acknowledged_once_committed(
    db_pool: asyncpg.Pool, database_url: str
) -> None:
    intake = WebhookIntake(db_pool, WebhookInbox(db_pool, NothingToBatch()))
    stuck, *others = [_invoice_paid() for _ in range(5)]
    held = await _hold(database_url, stuck.id)
    answers: dict[str, bool | Exception] = {}

    async def deliver(event: VerifiedEvent) -> None:
        try:
            answers[event.id] = await intake.store(event)
        except EventNotStored as exc:
            answers[event.id] = exc

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(intake.run)
            await wait_for(lambda: _running(intake), within=5, what="the intake to run")
            tg.start_soon(deliver, stuck)
            await wait_for(lambda: _blocked_on_a_lock(db_pool), within=10, what="the write to wait")
            # Written by another writer while the first group waits for the lock.
            for event in others:
                tg.start_soon(deliver, event)
            await wait_for(lambda: _all_answered(answers, 4), within=10, what="the other 4")
            assert answers == {e.id: True for e in others}
            assert await _stored(db_pool, stuck.id) == 0
            # Never acknowledged before its commit: the stuck one answers once it is written.
            await held.execute("ROLLBACK")
            await wait_for(lambda: _all_answered(answers, 5), within=10, what="the stuck one")
            tg.cancel_scope.cancel()
    finally:
        await held.close()
    assert answers[stuck.id] is True
    for event in [stuck, *others]:
        assert await _stored(db_pool, event.id) == 1


async def test_past_max_waiting_an_event_is_refused_at_once_and_none_acknowledged_is_lost(
    db_pool: asyncpg.Pool, database_url: str
) -> None:
    # One writer, all of it stuck: the database has stalled (with several writers the others
    # go on writing, see the test above).
    intake = WebhookIntake(
        db_pool, WebhookInbox(db_pool, NothingToBatch()), max_waiting=3, max_writes=1
    )
    first, *queued = [_invoice_paid() for _ in range(4)]
    extra = _invoice_paid()
    held = await _hold(database_url, first.id)
    answers: dict[str, bool | Exception] = {}

    async def deliver(event: VerifiedEvent) -> None:
        try:
            answers[event.id] = await intake.store(event)
        except EventNotStored as exc:
            answers[event.id] = exc

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(intake.run)
            await wait_for(lambda: _running(intake), within=5, what="the intake to run")
            tg.start_soon(deliver, first)
            await wait_for(lambda: _blocked_on_a_lock(db_pool), within=10, what="the write to wait")
            for event in queued:  # three wait behind the stuck group: the bound
                tg.start_soon(deliver, event)
            await anyio.sleep(0.05)
            with anyio.fail_after(1):  # refused at once, not queued
                with pytest.raises(IntakeFull):
                    await intake.store(extra)
            assert answers == {}
            await held.execute("ROLLBACK")
            await wait_for(lambda: _all_answered(answers, 4), within=10, what="4 answers")
            tg.cancel_scope.cancel()
    finally:
        await held.close()
    assert answers == {e.id: True for e in [first, *queued]}
    for event in [first, *queued]:
        assert await _stored(db_pool, event.id) == 1
    assert await _stored(db_pool, extra.id) == 0


async def test_a_full_announcement_buffer_holds_the_writer_and_then_refuses_never_drops(
    db_pool: asyncpg.Pool,
) -> None:
    handler = StalledAnnouncementHandler()
    intake = WebhookIntake(
        db_pool, WebhookInbox(db_pool, handler), max_waiting=2, max_unannounced=1
    )
    events = [_invoice_paid() for _ in range(5)]
    answers: dict[str, bool | Exception] = {}

    async def deliver(event: VerifiedEvent) -> None:
        try:
            answers[event.id] = await intake.store(event)
        except EventNotStored as exc:
            answers[event.id] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(intake.run)
        await wait_for(lambda: _running(intake), within=5, what="the intake to run")
        with anyio.fail_after(10):
            # 1: being announced (stuck); 2: in the buffer; 3: committed, waiting for room.
            for event in events[:3]:
                assert await intake.store(event) is True
        # 4 and 5 wait to be written: the bound. The sixth is refused, at once.
        for event in events[3:]:
            tg.start_soon(deliver, event)
        await anyio.sleep(0.1)
        with anyio.fail_after(1), pytest.raises(IntakeFull):
            await intake.store(_invoice_paid())
        assert answers == {}
        handler.release.set()
        await wait_for(lambda: _all_answered(answers, 2), within=10, what="the last two")
        await wait_for(lambda: _announced(handler, 5), within=10, what="every announcement")
        tg.cancel_scope.cancel()
    assert answers == {e.id: True for e in events[3:]}
    announced = [event_id for group in handler.announced for event_id in sorted(group)]
    assert sorted(announced) == sorted(e.id for e in events)
    assert handler.announced[:3] == [frozenset({e.id}) for e in events[:3]]


async def _answered(answers: list[bool | Exception]) -> bool:
    return bool(answers)


async def _all_answered(answers: dict[str, bool | Exception], count: int) -> bool:
    return len(answers) == count


async def _announced(handler: StalledAnnouncementHandler, events: int) -> bool:
    return sum(len(group) for group in handler.announced) == events
