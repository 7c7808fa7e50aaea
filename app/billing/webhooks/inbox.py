"""The webhook inbox worker: claims stored events and runs their handlers, with retries.

A row is claimed by one instance at a time (`FOR UPDATE SKIP LOCKED` plus a lock time), so
duplicate deliveries, even to two instances at once, have one effect. A handler that raises
is retried with capped exponential backoff and stays visible as `retrying` with its last
error. An error that means a dependency is down (`is_transient`: Stripe, PostgreSQL or Redis
unreachable) is retried for as long as Stripe itself would redeliver the event (3 days from
its receipt); any other (a bug, an impossible payload) ends in `failed` after a few tries,
which operators alert on (`lookout_webhooks_failed`) and `lookout webhooks replay` undoes.
Rows left `processing` by a killed process are claimed again once their lock time has passed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

import anyio
import asyncpg

from app.billing.errors import is_transient
from app.db import Connection
from provisioning import DATABASE_ERRORS

__all__ = [
    "Batch",
    "InboxCounts",
    "InboxEvent",
    "InboxHandler",
    "StoredEvent",
    "WebhookInbox",
    "inbox_counts",
    "list_events",
    "requeue_events",
]

logger = logging.getLogger(__name__)

# Errors that are not transient: this many fail the event (a bug that is really a race gets
# a few chances; 1 + 2 + ... + 64 s, two minutes).
MAX_PERMANENT_ERRORS = 8
# Stripe redelivers an event it got no 2xx for over 3 days: a dependency that is down is
# waited out as long, retried every 5 minutes at most.
REDELIVERY_WINDOW_SECONDS = 3 * 24 * 3600.0
BACKOFF_CAP_SECONDS = 300.0
# A claimed row is locked this long, and the claim renewed every RENEW_SECONDS while its
# handler runs (a Stripe call may take 30 s): a killed process's events are taken over by
# another instance within 3 s of its death, as the contract's 5 s asks.
LOCK_SECONDS = 3.0
RENEW_SECONDS = 1.0
SWEEP_SECONDS = 5.0
# A burst of events is claimed at once and handled side by side: with 20 a batch, 100
# confirmations at once reached operation.started at p99 602 ms; with 100, 372 ms.
BATCH = 100


@dataclass(frozen=True, slots=True)
class Batch:
    """What `handle_many` did: the events it handled for good, and what is left to do once
    its transaction has committed (announcing, typically)."""

    handled: frozenset[str] = frozenset()
    after_commit: Callable[[], Awaitable[None]] | None = None


class InboxHandler(Protocol):
    async def __call__(self, event: InboxEvent, /) -> None:
        """Handles one event; raising leaves it to be retried."""

    def batchable(self, event: InboxEvent, /) -> bool:
        """Whether `handle_many` may handle this event; the others skip its transaction."""

    async def handle_many(self, conn: Connection, events: Sequence[InboxEvent], /) -> Batch:
        """Handles what it can of a batch of batchable events, in the caller's transaction;
        raising leaves all of them to `__call__`."""


@dataclass(frozen=True, slots=True)
class InboxEvent:
    id: str
    type: str
    created: datetime
    payload: Mapping[str, Any]
    attempts: int

    @property
    def object(self) -> Mapping[str, Any]:
        data: Mapping[str, Any] = self.payload["data"]["object"]
        return data


_CLAIM = """
UPDATE webhook_events SET status = 'processing', attempts = attempts + 1,
       locked_until = now() + make_interval(secs => $2)
 WHERE id IN (
       SELECT id FROM webhook_events
        WHERE ($1::text IS NULL OR id = $1)
          AND next_attempt_at <= now()
          AND (status IN ('pending', 'retrying')
               OR (status = 'processing' AND locked_until < now()))
        ORDER BY stripe_created, received_at
        LIMIT $3
        FOR UPDATE SKIP LOCKED)
RETURNING id, type, stripe_created, payload, attempts
"""


# A handler failed: `retrying` until the window or the permanent errors run out, then `failed`.
_FAILED = """
UPDATE webhook_events SET
       last_error = $2, last_error_kind = $3, locked_until = NULL,
       permanent_errors = permanent_errors + ($3 = 'permanent')::int,
       status = CASE
           WHEN $3 = 'permanent' AND permanent_errors + 1 >= $5 THEN 'failed'
           WHEN $3 = 'transient'
                AND now() + make_interval(secs => $4) > received_at + make_interval(secs => $6)
           THEN 'failed'
           ELSE 'retrying' END,
       next_attempt_at = now() + make_interval(secs => $4)
 WHERE id = $1
"""


async def requeue_events(conn: Connection, *, event_id: str | None, failed: bool) -> int:
    """Puts one event (whatever its state) or all failed ones back in line, as new: its last
    error is kept for the record, but it is no longer counted as failing."""
    result = await conn.execute(
        "UPDATE webhook_events SET status = 'pending', next_attempt_at = now(),"
        " locked_until = NULL, attempts = 0, permanent_errors = 0, last_error_kind = NULL"
        " WHERE ($1::text IS NOT NULL AND id = $1) OR ($2 AND status = 'failed')",
        event_id,
        failed,
    )
    return int(result.split()[-1])


@dataclass(frozen=True, slots=True)
class InboxCounts:
    """The events not processed: `pending` are still to be tried (first time or again), of
    which `retrying_transient` after a dependency was down and `retrying_permanent` after
    another error; `failed` were given up on (`lookout webhooks replay`)."""

    pending: int = 0
    retrying_transient: int = 0
    retrying_permanent: int = 0
    failed: int = 0


async def inbox_counts(conn: Connection) -> InboxCounts:
    """Reads the unsettled events' index only (`webhook_events_unsettled`), not the table."""
    rows = await conn.fetch(
        "SELECT status, last_error_kind AS kind, count(*) AS n FROM webhook_events"
        " WHERE status <> 'processed' GROUP BY status, last_error_kind"
    )
    live = [r for r in rows if r["status"] != "failed"]
    return InboxCounts(
        pending=sum(r["n"] for r in live),
        retrying_transient=sum(r["n"] for r in live if r["kind"] == "transient"),
        retrying_permanent=sum(r["n"] for r in live if r["kind"] == "permanent"),
        failed=sum(r["n"] for r in rows if r["status"] == "failed"),
    )


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An inbox row as `lookout webhooks list` shows it."""

    id: str
    type: str
    status: str
    attempts: int
    last_error: str | None
    last_error_kind: str | None
    received_at: datetime
    next_attempt_at: datetime


_LISTS = {
    # Still to be tried, oldest first.
    "pending": "WHERE status <> 'processed' AND status <> 'failed' ORDER BY received_at",
    # Given up on, or being retried after an error.
    "failing": "WHERE status <> 'processed' AND (status = 'failed' OR last_error_kind IS NOT NULL)"
    " ORDER BY received_at",
    "all": "ORDER BY received_at DESC",
}


async def list_events(
    conn: Connection, which: Literal["pending", "failing", "all"], *, limit: int
) -> list[StoredEvent]:
    rows = await conn.fetch(
        "SELECT id, type, status, attempts, last_error, last_error_kind, received_at,"
        f" next_attempt_at FROM webhook_events {_LISTS[which]} LIMIT $1",
        limit,
    )
    return [StoredEvent(**dict(row)) for row in rows]


class WebhookInbox:
    def __init__(
        self,
        pool: asyncpg.Pool,
        handle: InboxHandler,
        *,
        backoff_cap: float = BACKOFF_CAP_SECONDS,
        redelivery_window: float = REDELIVERY_WINDOW_SECONDS,
    ) -> None:
        """`backoff_cap` and `redelivery_window` (seconds) bound the retries of an event
        whose handler failed on a dependency that is down."""
        self._pool = pool
        self._handle = handle
        self._backoff_cap = backoff_cap
        self._redelivery_window = redelivery_window
        self._wake = anyio.Event()

    def wake(self) -> None:
        """Something new is in the inbox: look now rather than at the next sweep."""
        self._wake.set()

    async def run(self) -> None:
        """Processes due events until cancelled; sweeps every few seconds and when woken."""
        while True:
            wait = SWEEP_SECONDS
            try:
                while await self.process_due():
                    pass
                wait = await self._until_next_due()
            except* DATABASE_ERRORS as group:
                # The database is down: one line a sweep, no traceback, and on with the loop.
                logger.warning(
                    "webhook inbox sweep failed (%s); retrying at the next sweep",
                    "; ".join(repr(e) for e in group.exceptions),
                )
            with anyio.move_on_after(wait):
                await self._wake.wait()
            self._wake = anyio.Event()

    async def _until_next_due(self) -> float:
        """Seconds until the next retry is due, or the claim of another (perhaps dead)
        instance lapses; at most a sweep: a backoff of 1 s is 1 s, a takeover 3 s."""
        async with self._pool.acquire() as conn:
            seconds = await conn.fetchval(
                "SELECT extract(epoch FROM min(CASE WHEN status = 'processing'"
                " THEN locked_until ELSE next_attempt_at END) - now()) FROM webhook_events"
                " WHERE status IN ('pending', 'processing', 'retrying')"
            )
        return SWEEP_SECONDS if seconds is None else max(0.01, min(float(seconds), SWEEP_SECONDS))

    async def process_due(self, event_id: str | None = None) -> int:
        """Claims and processes a batch of due events (or just `event_id`); answers how many.

        The handler handles the events it can batch in one transaction (a burst of payments:
        a few round trips in all rather than a dozen each); the rest, one by one."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(_CLAIM, event_id, LOCK_SECONDS, BATCH)
        events = [_event(row) for row in rows]
        claimed = {event.id for event in events}
        async with anyio.create_task_group() as keeper:
            keeper.start_soon(self._keep_claimed, claimed)
            batch = await self._together(events)
            claimed -= batch.handled
            if batch.after_commit is not None:
                try:
                    await batch.after_commit()
                except Exception:
                    # Committed: the operations it could not start are leased, and the
                    # runner's sweep resumes them once the leases lapse. The batch goes on.
                    logger.exception("announcing a webhook batch failed; operations resume later")
            # Side by side: each handler locks the subscription it changes, and applies
            # Stripe's current state rather than the payload's, so their order does not
            # matter. Nothing leaves `_process`: one event's failure cancels neither the
            # others nor the worker.
            processed: list[str] = []
            async with anyio.create_task_group() as tg:
                for event in events:
                    if event.id in claimed:
                        tg.start_soon(self._process, event, claimed, processed)
            # The events handled, marked processed in one statement (one commit) rather than
            # one each: at 200 webhooks/s those commits were half of this process's WAL
            # flushes, each one a wait for every other commit, the webhooks' first
            # (bench/billing.py, issue 15). Until then their claims are kept renewed.
            await self._record_processed(processed)
            claimed.difference_update(processed)
            keeper.cancel_scope.cancel()
        return len(events)

    async def _keep_claimed(self, claimed: set[str]) -> None:
        """Renews the lock of the events still being handled, until cancelled. Should a renewal
        fail for a whole lock time, another instance may take an event over and handle it too:
        handlers are idempotent, and that beats an event stuck behind a dead process."""
        while True:
            await anyio.sleep(RENEW_SECONDS)
            if not claimed:
                continue
            try:
                async with self._pool.acquire() as conn:
                    await conn.execute(
                        "UPDATE webhook_events SET locked_until = now() + make_interval(secs => $2)"
                        " WHERE id = ANY($1::text[]) AND status = 'processing'",
                        list(claimed),
                        LOCK_SECONDS,
                    )
            except DATABASE_ERRORS as exc:
                logger.warning(
                    "webhook claims not renewed (%r); retrying in %s s", exc, RENEW_SECONDS
                )

    async def _together(self, events: Sequence[InboxEvent]) -> Batch:
        if not self.any_batchable(events):
            return Batch()
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                return await self.handle_together(conn, events)
        except Exception:
            # Nothing was committed, and the events are claimed: one by one, now.
            logger.exception("webhook batch of %d failed; handling them one by one", len(events))
            return Batch()

    def any_batchable(self, events: Sequence[InboxEvent]) -> bool:
        return any(self._handle.batchable(e) for e in events)

    async def handle_together(self, conn: Connection, events: Sequence[InboxEvent]) -> Batch:
        """In the caller's transaction: the handler's batch of the events it can batch, and
        those it handled marked processed."""
        batch = await self._handle.handle_many(
            conn, [e for e in events if self._handle.batchable(e)]
        )
        if batch.handled:
            await conn.execute(
                "UPDATE webhook_events SET status = 'processed', processed_at = now(),"
                " locked_until = NULL, last_error = NULL, last_error_kind = NULL"
                " WHERE id = ANY($1::text[])",
                list(batch.handled),
            )
        return batch

    async def _process(self, event: InboxEvent, claimed: set[str], processed: list[str]) -> None:
        """Handles one event; one handled is added to ``processed`` (still claimed), for
        `_record_processed`."""
        try:
            await self._handle(event)
        except Exception as exc:
            # The boundary of a background task: whatever went wrong is kept on the row.
            try:
                await self._record_failure(event, exc)
            finally:
                claimed.discard(event.id)
            return
        processed.append(event.id)

    async def _record_processed(self, event_ids: Sequence[str]) -> None:
        """Marks handled events processed. When that fails, the rows stay claimed: another
        sweep takes them again once their lock time has passed (handlers are idempotent), so
        nothing is lost."""
        if not event_ids:
            return
        try:
            async with self._pool.acquire() as conn:
                await conn.execute(
                    "UPDATE webhook_events SET status = 'processed', processed_at = now(),"
                    " locked_until = NULL, last_error = NULL, last_error_kind = NULL"
                    " WHERE id = ANY($1::text[])",
                    list(event_ids),
                )
        except DATABASE_ERRORS as exc:
            logger.warning(
                "%d webhooks: their outcome was not recorded (%r); they are tried again in %s s",
                len(event_ids),
                exc,
                LOCK_SECONDS,
            )

    async def _record_failure(self, event: InboxEvent, exc: Exception) -> None:
        transient = is_transient(exc)
        backoff = min(2.0 ** min(event.attempts - 1, 30), self._backoff_cap)
        if transient:
            # A dependency is down: expected, and retried; one line, not a traceback each.
            logger.warning(
                "webhook %s (%s) waits for a dependency, attempt %d: %r; retrying in %.3g s",
                event.id,
                event.type,
                event.attempts,
                exc,
                backoff,
            )
        else:
            logger.exception(
                "webhook %s (%s) failed, attempt %d", event.id, event.type, event.attempts
            )
        await self._record(
            event,
            _FAILED,
            event.id,
            f"{exc.__class__.__name__}: {exc}"[:2000],
            "transient" if transient else "permanent",
            backoff,
            MAX_PERMANENT_ERRORS,
            self._redelivery_window,
        )

    async def _record(self, event: InboxEvent, statement: str, *args: Any) -> None:
        """Writes an event's outcome. When that fails too, the row stays claimed: another
        sweep takes it again once its lock time has passed, so nothing is lost."""
        try:
            async with self._pool.acquire() as conn:
                await conn.execute(statement, *args)
        except DATABASE_ERRORS as exc:
            logger.warning(
                "webhook %s: its outcome was not recorded (%r); it is tried again in %s s",
                event.id,
                exc,
                LOCK_SECONDS,
            )
        except Exception:
            # The boundary of one event's task: a bug here must not end the worker either.
            logger.exception("webhook %s: its outcome was not recorded", event.id)


def _event(row: asyncpg.Record) -> InboxEvent:
    return InboxEvent(
        id=row["id"],
        type=row["type"],
        created=row["stripe_created"],
        payload=_as_mapping(row["payload"]),
        attempts=row["attempts"],
    )


def _as_mapping(value: Any) -> Mapping[str, Any]:
    if isinstance(value, str):
        loaded: Mapping[str, Any] = json.loads(value)
        return loaded
    mapping: Mapping[str, Any] = value
    return mapping
