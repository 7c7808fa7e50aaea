"""The inbox worker under real faults: Stripe refusing connections, PostgreSQL dropping the
worker's connection mid-statement; what is retried, what fails, and what it counts."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import anyio
import asyncpg
import pytest
from redis.asyncio import Redis

from app.billing.provider import PaymentProvider, PaymentProviderNotFound
from app.billing.stripe.provider import StripePaymentProvider
from app.billing.webhooks.inbox import (
    MAX_PERMANENT_ERRORS,
    Batch,
    InboxCounts,
    InboxEvent,
    WebhookInbox,
    inbox_counts,
    list_events,
)
from app.billing.webhooks.receiver import parse_event, store_events
from app.db import Connection
from app.demo.stripe_emulator import create_emulator
from tests.support.live import free_port, live_server
from tests.support.stack import wait_for
from tests.support.stripe_events import make_event, stripe_object

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[4]


class FetchesFromStripe:
    """Handles an event as the real handlers do: by fetching its object from Stripe."""

    def __init__(self, provider: PaymentProvider) -> None:
        self._provider = provider
        self.fetched: list[str] = []

    async def __call__(self, event: InboxEvent) -> None:
        # Not found: Stripe answered, and the payload is what we have.
        with contextlib.suppress(PaymentProviderNotFound):
            await self._provider.retrieve_subscription(str(event.object["id"]))
        self.fetched.append(event.id)

    def batchable(self, event: InboxEvent) -> bool:
        return False

    async def handle_many(self, conn: Connection, events: Sequence[InboxEvent]) -> Batch:
        return Batch()


class ImpossiblePayload:
    """Fails on every event as a bug or a payload we cannot make sense of would."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, event: InboxEvent) -> None:
        self.calls += 1
        raise KeyError("lookout_subscription_id")

    def batchable(self, event: InboxEvent) -> bool:
        return False

    async def handle_many(self, conn: Connection, events: Sequence[InboxEvent]) -> Batch:
        return Batch()


async def _store(pool: asyncpg.Pool, event_type: str = "customer.subscription.updated") -> str:
    event = parse_event(json.dumps(make_event(event_type, stripe_object("subscription"))))
    async with pool.acquire() as conn:
        await store_events(conn, [event])
    return event.id


async def _row(pool: asyncpg.Pool, event_id: str) -> asyncpg.Record:
    async with pool.acquire() as conn:
        row: asyncpg.Record | None = await conn.fetchrow(
            "SELECT status, attempts, last_error, last_error_kind FROM webhook_events"
            " WHERE id = $1",
            event_id,
        )
        assert row is not None
        return row


async def _counts(pool: asyncpg.Pool) -> InboxCounts:
    async with pool.acquire() as conn:
        return await inbox_counts(conn)


async def test_while_stripe_refuses_connections_an_event_is_retried_not_failed(
    db_pool: asyncpg.Pool,
) -> None:
    port = free_port()  # nothing listens there: Stripe refuses every connection
    provider = StripePaymentProvider(
        "sk_test_lookout",
        environment="test",
        api_base=f"http://127.0.0.1:{port}",
        max_network_retries=0,
    )
    handler = FetchesFromStripe(provider)
    inbox = WebhookInbox(db_pool, handler, backoff_cap=0.05)
    event_id = await _store(db_pool)
    async with db_pool.acquire() as conn:
        # As after two minutes of earlier tries: the attempt at which the worker gave up.
        await conn.execute("UPDATE webhook_events SET attempts = 7 WHERE id = $1", event_id)

    async def tried(times: int) -> bool:
        row = await _row(db_pool, event_id)
        return bool(row["attempts"] >= times and row["last_error"] is not None)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(inbox.run)
            await wait_for(lambda: tried(8), within=20, what="the eighth attempt")
            row = await _row(db_pool, event_id)
            # With a 0.05 s backoff the worker may already have claimed the next attempt
            # ("processing"); what matters is that it was not marked failed.
            assert row["status"] in ("retrying", "processing"), row
            assert row["last_error_kind"] == "transient", row
            assert "PaymentProviderUnavailable" in row["last_error"]
            await wait_for(lambda: tried(12), within=20, what="more attempts")
            row = await _row(db_pool, event_id)
            assert row["status"] in ("retrying", "processing")
            counts = await _counts(db_pool)
            assert (counts.pending, counts.retrying_transient, counts.failed) == (1, 1, 0)
            async with db_pool.acquire() as conn:
                failing = await list_events(conn, "failing", limit=10)
            assert [e.id for e in failing] == [event_id]

            # Stripe is back, on the same address: the event goes through, once.
            emulator = create_emulator(
                webhook_url=None,
                webhook_secret=f"whsec_{secrets.token_hex(8)}",
                public_url=f"http://127.0.0.1:{port}",
            )
            async with live_server(emulator, port=port):
                await wait_for(
                    lambda: _status_is(db_pool, event_id, "processed"),
                    within=20,
                    what="the event to be processed",
                )
            tg.cancel_scope.cancel()
    finally:
        await provider.aclose()
    assert handler.fetched == [event_id]
    assert (await _row(db_pool, event_id))["last_error_kind"] is None
    assert await _counts(db_pool) == InboxCounts()


async def test_a_transient_error_past_stripes_redelivery_window_fails_the_event(
    db_pool: asyncpg.Pool,
) -> None:
    port = free_port()
    provider = StripePaymentProvider(
        "sk_test_lookout",
        environment="test",
        api_base=f"http://127.0.0.1:{port}",
        max_network_retries=0,
    )
    inbox = WebhookInbox(db_pool, FetchesFromStripe(provider))
    event_id = await _store(db_pool)
    async with db_pool.acquire() as conn:
        await conn.execute(
            "UPDATE webhook_events SET received_at = now() - interval '3 days' WHERE id = $1",
            event_id,
        )
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(inbox.run)
            await wait_for(lambda: _status_is(db_pool, event_id, "failed"), within=20)
            tg.cancel_scope.cancel()
    finally:
        await provider.aclose()
    assert (await _row(db_pool, event_id))["last_error_kind"] == "transient"
    assert (await _counts(db_pool)).failed == 1


async def test_an_error_that_is_not_transient_fails_the_event_after_a_few_tries(
    db_pool: asyncpg.Pool,
) -> None:
    handler = ImpossiblePayload()
    inbox = WebhookInbox(db_pool, handler, backoff_cap=0.01)
    event_id = await _store(db_pool)
    async with anyio.create_task_group() as tg:
        tg.start_soon(inbox.run)
        await wait_for(lambda: _status_is(db_pool, event_id, "failed"), within=30)
        tg.cancel_scope.cancel()
    row = await _row(db_pool, event_id)
    assert (row["attempts"], row["last_error_kind"]) == (MAX_PERMANENT_ERRORS, "permanent")
    assert handler.calls == MAX_PERMANENT_ERRORS
    assert await _counts(db_pool) == InboxCounts(failed=1)
    async with db_pool.acquire() as conn:
        assert [e.id for e in await list_events(conn, "failing", limit=10)] == [event_id]
        assert await list_events(conn, "pending", limit=10) == []


class HeldAfterHandling:
    """Handles at once, then waits (`release`) before the worker records the outcome."""

    def __init__(self) -> None:
        self.called = anyio.Event()
        self.release = anyio.Event()
        self.handled: list[str] = []

    async def __call__(self, event: InboxEvent) -> None:
        self.handled.append(event.id)
        if not self.called.is_set():
            self.called.set()
            await self.release.wait()

    def batchable(self, event: InboxEvent) -> bool:
        return False

    async def handle_many(self, conn: Connection, events: Sequence[InboxEvent]) -> Batch:
        return Batch()


async def test_a_connection_dropped_while_recording_an_outcome_does_not_end_the_worker(
    db_pool: asyncpg.Pool, database_url: str
) -> None:
    handler = HeldAfterHandling()
    inbox = WebhookInbox(db_pool, handler)
    first = await _store(db_pool)
    holder = await asyncpg.connect(database_url)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(inbox.run)
            with anyio.fail_after(10):
                await handler.called.wait()
            # The row is locked elsewhere: the worker's "processed" UPDATE waits on it, and
            # PostgreSQL drops the worker's connection in the middle of that statement.
            await holder.execute("BEGIN")
            await holder.execute("SELECT 1 FROM webhook_events WHERE id = $1 FOR UPDATE", first)
            handler.release.set()
            await wait_for(lambda: _terminate_blocked_update(db_pool), within=10)
            await holder.execute("ROLLBACK")
            # The worker is still running: the next event is processed.
            second = await _store(db_pool)
            inbox.wake()
            await wait_for(lambda: _status_is(db_pool, second, "processed"), within=20)
            # The first stayed claimed until its lock time passed, then was taken again.
            await wait_for(lambda: _status_is(db_pool, first, "processed"), within=20)
            tg.cancel_scope.cancel()
    finally:
        await holder.close()
    assert sorted(handler.handled) == sorted([first, first, second])


async def _terminate_blocked_update(pool: asyncpg.Pool) -> bool:
    async with pool.acquire() as conn:
        terminated = await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            " AND query LIKE 'UPDATE webhook_events SET status = ''processed''%'"
        )
    return bool(terminated)


async def _status_is(pool: asyncpg.Pool, event_id: str, status: str) -> bool:
    return bool((await _row(pool, event_id))["status"] == status)


async def test_the_inbox_counts_read_the_index_of_unsettled_events(db_pool: asyncpg.Pool) -> None:
    async with db_pool.acquire() as conn, conn.transaction():
        # On a small table a sequential scan is cheaper; forbidden, the plan shows whether
        # the query can use the partial index at all.
        await conn.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                "EXPLAIN SELECT status, last_error_kind AS kind, count(*) AS n"
                " FROM webhook_events WHERE status <> 'processed'"
                " GROUP BY status, last_error_kind"
            )
        )
    assert "webhook_events_unsettled" in plan, plan


class Recording:
    def __init__(self) -> None:
        self.handled: dict[str, float] = {}

    async def __call__(self, event: InboxEvent) -> None:
        self.handled[event.id] = anyio.current_time()

    def batchable(self, event: InboxEvent) -> bool:
        return False

    async def handle_many(self, conn: Connection, events: Sequence[InboxEvent]) -> Batch:
        return Batch()


async def test_an_event_a_killed_process_was_handling_is_taken_over_within_5_s(
    db_pool: asyncpg.Pool, database_url: str
) -> None:
    event_id = await _store(db_pool)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    command = [sys.executable, str(Path(__file__).with_name("child_inbox.py")), database_url]
    async with await anyio.open_process(command, env=env, cwd=ROOT, stderr=None) as child:
        assert child.stdout is not None
        line = b""
        with anyio.fail_after(30):
            while not line.endswith(b"\n"):
                line += await child.stdout.receive(1)
        assert line.split() == [b"HOLDING", event_id.encode()]
        os.kill(child.pid, signal.SIGKILL)  # the machine dies mid-handler
        killed_at = anyio.current_time()
        assert await child.wait() == -signal.SIGKILL
    assert (await _row(db_pool, event_id))["status"] == "processing"
    handler = Recording()
    async with anyio.create_task_group() as tg:
        tg.start_soon(WebhookInbox(db_pool, handler).run)  # a surviving instance
        await wait_for(lambda: _status_is(db_pool, event_id, "processed"), within=30)
        tg.cancel_scope.cancel()
    assert handler.handled[event_id] - killed_at < 5.0


class CallsADependency:
    """Handles an event by calling a server that refuses connections."""

    def __init__(self, call: Callable[[], Awaitable[object]]) -> None:
        self._call = call

    async def __call__(self, event: InboxEvent) -> None:
        await self._call()

    def batchable(self, event: InboxEvent) -> bool:
        return False

    async def handle_many(self, conn: Connection, events: Sequence[InboxEvent]) -> Batch:
        return Batch()


async def _redis_down() -> object:
    client = Redis.from_url(f"redis://127.0.0.1:{free_port()}", socket_timeout=2)
    try:
        return await client.ping()
    finally:
        await client.aclose()


async def _postgres_down() -> object:
    return await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")


@pytest.mark.parametrize("call", [_redis_down, _postgres_down], ids=["redis", "postgresql"])
async def test_redis_or_postgresql_refusing_connections_is_transient(
    db_pool: asyncpg.Pool, call: Callable[[], Awaitable[object]]
) -> None:
    inbox = WebhookInbox(db_pool, CallsADependency(call))
    event_id = await _store(db_pool)
    async with db_pool.acquire() as conn:
        await conn.execute("UPDATE webhook_events SET attempts = 7 WHERE id = $1", event_id)

    async def failed_once() -> bool:
        return (await _row(db_pool, event_id))["last_error"] is not None

    async with anyio.create_task_group() as tg:
        tg.start_soon(inbox.run)
        await wait_for(failed_once, within=20, what="the first failure")
        tg.cancel_scope.cancel()
    row = await _row(db_pool, event_id)
    assert (row["status"], row["last_error_kind"]) == ("retrying", "transient"), row
