"""Storing verified webhooks in the inbox, in groups: the events that arrive together are
written by one INSERT and one commit (a group commit), and the payments among them are
fulfilled in that same transaction.

A burst of 100 confirmations used to be 100 commits on the request path, then a worker's
claim, then the fulfilment: each a queue of its own. Now a request waits for the group its
event joined, which is written as soon as a writer is free; its payment is then already
committed as a provisioning operation, announced right after.

Up to `MAX_WRITES_IN_FLIGHT` groups are written at once. With one, every webhook waited behind
the group before it: a group with payments holds its transaction for several round trips
(p50 48 ms, p99 300 ms at 200 webhooks/s with provisioning running, against 5 ms for a group
without), and one commit's WAL flush can take 100 ms on a busy disk; the single writer was busy
80 % of a run and the queue behind it was the acknowledgement's tail (bench/billing.py,
issue 15). Groups written at once commit in whatever order PostgreSQL finishes them, and are
announced in that order: each group's announcement is about its own events only.

A request is answered 2xx only once its event's write has committed: a write that fails, or
that is cancelled (shutdown, a crash of the writer), answers `EventNotStored` and the route
answers 503, so that Stripe delivers the event again. Both buffers are bounded: past them a
webhook is refused at once (503 with `Retry-After`), never queued without end.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import anyio
import anyio.lowlevel
import asyncpg
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from app.billing.errors import is_transient
from app.billing.webhooks.inbox import BATCH, Batch, InboxEvent, WebhookInbox
from app.billing.webhooks.receiver import VerifiedEvent, store_events
from app.db import Connection
from provisioning import DATABASE_ERRORS

__all__ = [
    "MAX_UNANNOUNCED",
    "MAX_WAITING",
    "MAX_WRITES_IN_FLIGHT",
    "EventNotStorable",
    "EventNotStored",
    "IntakeFull",
    "IntakeNotRunning",
    "Unsettled",
    "WebhookIntake",
    "WritePhase",
]

logger = logging.getLogger(__name__)

# The two parts of an event's time in the intake (`WebhookIntake(observe_write=)`).
WritePhase = Literal["waiting", "writing"]

_UNSTORABLE = (asyncpg.UntranslatableCharacterError, asyncpg.CharacterNotInRepertoireError)

# Events received and not yet written. A group of 100 commits in a few ms, so 2000 waiting
# means the database has stalled for a while: answering 503 at once (Stripe retries) beats
# holding 2000 more requests and their bodies (up to 1 MiB each) in memory.
MAX_WAITING = 2000
# Committed groups whose announcement (Redis) is still to run. Past it the writer waits for
# room: nothing committed is dropped, the waiting events pile up to MAX_WAITING, then 503.
MAX_UNANNOUNCED = 64
# Groups being written at once, each on its own pool connection. Enough that a group holding a
# transaction (payments) or waiting for a WAL flush does not hold up the next; more would only
# split a burst into smaller groups, each its own commit.
MAX_WRITES_IN_FLIGHT = 4


class EventNotStorable(Exception):
    """PostgreSQL cannot store this event's text (a NUL character, say)."""


class EventNotStored(Exception):
    """The event's write did not commit (the database failed, or the intake stopped during the
    write): nothing is acknowledged; answer 503 so that Stripe delivers it again."""

    retry_after = 5


class IntakeNotRunning(EventNotStored):
    """The intake's task is not running: start `WebhookIntake.run` in the app's task group."""


class IntakeFull(EventNotStored):
    """More events wait to be written than the intake holds (`max_waiting`): the database is
    slower than the webhooks arrive. Answer 503; Stripe delivers the event again."""

    retry_after = 10


@dataclass(frozen=True, slots=True)
class _Announcement:
    """What is left to do for a committed group: run its batch's `after_commit`, wake the
    inbox worker for the events the batch left, and count its events settled."""

    batch: Batch
    left_for_the_worker: bool
    events: int
    # When each event the batch handled was received (`VerifiedEvent.received_at`, epoch
    # seconds): those are the payments whose operation.started the announcement publishes.
    handled_received_at: tuple[float, ...] = ()


@dataclass(eq=False)
class _Waiting:
    event: VerifiedEvent
    done: anyio.Event = field(default_factory=anyio.Event)
    arrived: float = field(default_factory=time.perf_counter)
    new: bool = False
    # Set only once the write holding the event has committed: whatever else wakes the
    # request (an error, a cancelled write, the intake stopping) means "not stored".
    stored: bool = False
    error: Exception | None = None


class Unsettled:
    """The events stored but whose group is not yet written and announced: what provisioning
    steps give way to (`provisioning.Foreground`). Apart from the intake, so that the runner
    can be handed it before the intake (whose handlers need the runner) exists."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = anyio.Event()
        self._idle.set()

    def arrived(self) -> None:
        if self._idle.is_set():
            self._idle = anyio.Event()
        self._count += 1

    def settle(self, events: int) -> None:
        self._count -= events
        if self._count == 0:
            self._idle.set()

    def clear(self) -> None:
        self._count = 0
        self._idle.set()

    async def quiet(self) -> None:
        """Returns once every event stored is written and announced."""
        while True:
            idle = self._idle
            await idle.wait()
            # Requests already received store their events before this answers.
            await anyio.lowlevel.checkpoint()
            if self._idle is idle:
                return


class WebhookIntake:
    def __init__(
        self,
        pool: asyncpg.Pool,
        inbox: WebhookInbox,
        *,
        unsettled: Unsettled | None = None,
        max_waiting: int = MAX_WAITING,
        max_unannounced: int = MAX_UNANNOUNCED,
        max_writes: int = MAX_WRITES_IN_FLIGHT,
        observe_started: Callable[[float], None] | None = None,
        observe_write: Callable[[WritePhase, float], None] | None = None,
    ) -> None:
        """Events go into `inbox`'s table; its handler's batch runs in the group's transaction,
        and the inbox worker is woken for what is left. ``observe_started(seconds)``: called,
        for each event the batch handled (a payment), with the time from its receipt to the end
        of its announcement (its operation.started published). ``observe_write(phase,
        seconds)``: called twice for each event written, with how long it waited for its
        group's write to begin (``"waiting"``) and how long that write took until its commit
        (``"writing"``, the payments' statements and the WAL flush included): a slow
        acknowledgement is placed in the intake's queue or in PostgreSQL."""
        if max_waiting < 1 or max_unannounced < 1 or max_writes < 1:
            raise ValueError("WebhookIntake bounds must be at least 1")
        self._max_writes = max_writes
        self._writes = 0
        self._write_done = anyio.Event()
        self._pool = pool
        self._inbox = inbox
        self._max_waiting = max_waiting
        self._max_unannounced = max_unannounced
        self._queue: list[_Waiting] = []
        self._arrived = anyio.Event()
        self._running = False
        self._unsettled = Unsettled() if unsettled is None else unsettled
        self._observe_started = observe_started
        self._observe_write = observe_write

    @property
    def running(self) -> bool:
        return self._running

    async def store(self, event: VerifiedEvent) -> bool:
        """Answers, once the event is committed, whether it is new (not a redelivery).

        Raises `EventNotStored` (or `EventNotStorable`) when it was not committed."""
        if not self._running:
            raise IntakeNotRunning("the webhook intake is not running")
        if len(self._queue) >= self._max_waiting:
            raise IntakeFull(
                f"{len(self._queue)} webhook events wait to be written; refusing more for now"
            )
        waiting = _Waiting(event)
        self._unsettled.arrived()
        self._queue.append(waiting)
        self._arrived.set()
        await waiting.done.wait()
        if isinstance(waiting.error, EventNotStorable | EventNotStored):
            raise waiting.error
        if not waiting.stored:
            raise EventNotStored(
                f"webhook {event.id} was not stored ({waiting.error or 'its write was cancelled'})"
            ) from waiting.error
        return waiting.new

    async def quiet(self) -> None:
        """Returns once every event stored is written and announced: provisioning steps give
        way to a burst of webhooks (`provisioning.Foreground`)."""
        await self._unsettled.quiet()

    async def run(self) -> None:
        """Writes the queued events, up to `max_writes` groups at once, until cancelled. Each
        group is announced (`Batch.after_commit`) by a second task, in the order the writes
        committed, while the next ones are written: a write need not wait for Redis, nor a
        slow Redis hold up the webhooks."""
        self._running = True
        announce, announcements = anyio.create_memory_object_stream[_Announcement](
            self._max_unannounced
        )
        try:
            async with announce, announcements, anyio.create_task_group() as tg:
                await self._warm_up()
                tg.start_soon(self._announce_in_order, announcements)
                while True:
                    await self._arrived.wait()
                    # Requests already received run up to here first: they join this group.
                    await anyio.lowlevel.checkpoint()
                    self._arrived = anyio.Event()
                    while self._queue:
                        while not self._may_write(announce):
                            # The events arriving meanwhile join the next group.
                            self._write_done = anyio.Event()
                            await self._write_done.wait()
                        group, self._queue = self._queue[:BATCH], self._queue[BATCH:]
                        self._writes += 1
                        tg.start_soon(self._write_and_hand_over, group, announce)
        finally:
            self._running = False
            for waiting in self._queue:
                waiting.error = IntakeNotRunning("the webhook intake stopped before its write")
                waiting.done.set()
            self._queue = []
            # What was queued, being written or left to announce is settled with the task: a
            # committed group not announced has its operations resumed by the runner's sweep
            # once their leases lapse.
            self._unsettled.clear()

    def _may_write(self, announce: MemoryObjectSendStream[_Announcement]) -> bool:
        """One write may always start. Another only while a writer is free and the groups
        being written fit in the announcement buffer beside those waiting there: when Redis is
        slow, one committed group waits for room and the events behind it pile up to
        `max_waiting` (then 503), as with a single writer, rather than more being committed
        than can be announced."""
        if self._writes == 0:
            return True
        buffered = announce.statistics().current_buffer_used
        return self._writes < self._max_writes and buffered + self._writes < self._max_unannounced

    async def _write_and_hand_over(
        self, group: list[_Waiting], announce: MemoryObjectSendStream[_Announcement]
    ) -> None:
        try:
            try:
                announcement = await self._write(group)
            except DATABASE_ERRORS as exc:
                # Its requests answer 503 and Stripe delivers them again. One line, not a
                # traceback per group, while the database is down.
                logger.warning("webhook group of %d not stored: %r", len(group), exc)
                self._unsettled.settle(len(group))
                return
            # Waits for room when Redis is slow: the waiting events pile up, and past
            # `max_waiting` new ones are refused, rather than memory growing.
            await announce.send(announcement)
        finally:
            self._writes -= 1
            self._write_done.set()

    async def _warm_up(self) -> None:
        """Runs the group transaction's statements, on no rows, on each connection the pool
        keeps open. A connection's first statements cost a plan each, and its server process
        a load of catalog caches (10 ms here): the first group of the first burst would pay
        that while the rest of the burst waits behind it."""
        try:
            async with contextlib.AsyncExitStack() as held:
                for _ in range(self._pool.get_min_size()):
                    conn = await held.enter_async_context(self._pool.acquire())
                    async with conn.transaction():
                        await store_events(conn, [])
                        await self._inbox.handle_together(conn, [])
        except DATABASE_ERRORS as exc:
            logger.warning("webhook intake not warmed up (%s); its first group will be slower", exc)

    async def _announce_in_order(
        self, announcements: MemoryObjectReceiveStream[_Announcement]
    ) -> None:
        async for announcement in announcements:
            try:
                if announcement.batch.after_commit is not None:
                    await announcement.batch.after_commit()
                if self._observe_started is not None:
                    now = time.time()
                    for received in announcement.handled_received_at:
                        self._observe_started(now - received)
            except Exception:
                # Committed and acknowledged; the operations it could not start are leased
                # and the runner's sweep resumes them once their leases lapse. The next
                # groups must still be announced.
                logger.exception("announcing a webhook group failed; its operations resume later")
            finally:
                if announcement.left_for_the_worker:
                    self._inbox.wake()
                self._unsettled.settle(announcement.events)

    async def _write(self, group: Sequence[_Waiting]) -> _Announcement:
        try:
            try:
                new, batch = await self._write_together(group, handle=True)
            except _UNSTORABLE:
                new, batch = await self._write_one_by_one(group), Batch()
            except Exception as exc:
                # The request boundary of a whole group: store them, fulfil them later. A
                # dependency away (a terminated backend, a failover) is one line; anything
                # else is a bug and gets its traceback.
                if is_transient(exc):
                    logger.warning("webhook group of %d not handled together: %r", len(group), exc)
                else:
                    logger.exception("webhook group of %d not handled together", len(group))
                new, batch = await self._write_together(group, handle=False)
        except Exception as exc:
            for waiting in group:
                waiting.error = waiting.error or exc
            raise
        finally:
            # Also when cancelled mid-write: those whose commit was not seen are not `stored`
            # and answer 503.
            for waiting in group:
                waiting.done.set()
        handled = tuple(
            e.received_at.timestamp() for e in _first_of_each(group) if e.id in batch.handled
        )
        return _Announcement(batch, bool(new - batch.handled), len(group), handled)

    async def _write_together(
        self, group: Sequence[_Waiting], *, handle: bool
    ) -> tuple[set[str], Batch]:
        """Answers the ids that were new, and what the batch handler did with them. Raises only
        when the write did not commit (see `_committing`)."""
        began = time.perf_counter()
        verified = _first_of_each(group)
        events = [_inbox_event(e) for e in verified]
        batch = Batch()
        # Each request is answered as soon as its write has committed, before the connection
        # goes back to the pool: asyncpg's release is a task of its own, one or two turns of
        # a busy loop (p50 1.4 ms, p99 13 ms at 200 webhooks/s) that no request need wait for.
        async with self._committing(len(group)) as conn:
            if not (handle and self._inbox.any_batchable(events)):
                # Nothing to fulfil here: one statement, its own transaction.
                new = await store_events(conn, verified)
            else:
                async with conn.transaction():
                    new = await store_events(conn, verified)
                    batch = await self._inbox.handle_together(
                        conn, [e for e in events if e.id in new]
                    )
            _answer(group, new, now=True)
            self._observe_group(group, began)
        return new, batch

    def _observe_group(self, group: Sequence[_Waiting], began: float) -> None:
        if self._observe_write is None:
            return
        wrote = time.perf_counter() - began
        for waiting in group:
            self._observe_write("waiting", began - waiting.arrived)
            self._observe_write("writing", wrote)

    async def _write_one_by_one(self, group: Sequence[_Waiting]) -> set[str]:
        """One event of the group cannot be stored: store the others, refuse that one."""
        new: set[str] = set()
        for event in _first_of_each(group):
            try:
                async with self._committing(1) as conn:
                    new |= await store_events(conn, [event])
            except _UNSTORABLE:
                for waiting in group:
                    if waiting.event.id == event.id:
                        waiting.error = EventNotStorable(event.id)
        _answer(group, new)
        return new

    @contextlib.asynccontextmanager
    async def _committing(self, events: int) -> AsyncIterator[Connection]:
        """A pool connection for a write that has committed once the block ends without
        error. What fails after that, as the connection goes back to the pool (a connection
        cut right after its COMMIT fails asyncpg's reset), is logged and not raised: taken
        for the write failing, it stored the group again as repeats (handled by no one) and
        dropped its announcement, whose operations then waited for their leases to lapse."""
        committed = False
        try:
            async with self._pool.acquire() as conn:
                yield conn
                committed = True
        except DATABASE_ERRORS as exc:
            if not committed:
                raise
            logger.warning(
                "webhook group of %d committed; its connection then failed (%r)", events, exc
            )


def _first_of_each(group: Sequence[_Waiting]) -> list[VerifiedEvent]:
    events: dict[str, VerifiedEvent] = {}
    for waiting in group:
        events.setdefault(waiting.event.id, waiting.event)
    return list(events.values())


def _answer(group: Sequence[_Waiting], new: set[str], *, now: bool = False) -> None:
    """Called once the group's write has committed; ``now``: wake its requests at once
    (otherwise `WebhookIntake._write` does, once the write is over)."""
    # Only the first delivery of an id in the group counts as new.
    answered: set[str] = set()
    for waiting in group:
        waiting.new = waiting.event.id in new and waiting.event.id not in answered
        answered.add(waiting.event.id)
        waiting.stored = waiting.error is None
        if now:
            waiting.done.set()


def _inbox_event(event: VerifiedEvent) -> InboxEvent:
    return InboxEvent(
        id=event.id, type=event.type, created=event.created, payload=event.payload, attempts=1
    )
