"""Storing verified webhooks in the inbox, in groups: the events that arrive together are
written by one INSERT and one commit (a group commit), and the payments among them are
fulfilled in that same transaction.

A burst of 100 confirmations used to be 100 commits on the request path, then a worker's
claim, then the fulfilment: each a queue of its own. Now a request waits for the group its
event joined, which is written as soon as the previous one is done; its payment is then
already committed as a provisioning operation, announced right after.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel
import asyncpg
from anyio.streams.memory import MemoryObjectReceiveStream

from app.billing.inbox import BATCH, Batch, InboxEvent, WebhookInbox
from app.billing.webhook_receiver import VerifiedEvent, store_events

__all__ = ["EventNotStorable", "IntakeNotRunning", "WebhookIntake"]

logger = logging.getLogger(__name__)

_UNSTORABLE = (asyncpg.UntranslatableCharacterError, asyncpg.CharacterNotInRepertoireError)


class EventNotStorable(Exception):
    """PostgreSQL cannot store this event's text (a NUL character, say)."""


class IntakeNotRunning(Exception):
    """The intake's task is not running: start `WebhookIntake.run` in the app's task group."""


@dataclass(frozen=True, slots=True)
class _Announcement:
    """What is left to do for a committed group: run its batch's `after_commit`, wake the
    inbox worker for the events the batch left, and count its events settled."""

    batch: Batch
    left_for_the_worker: bool
    events: int


@dataclass(eq=False)
class _Waiting:
    event: VerifiedEvent
    done: anyio.Event = field(default_factory=anyio.Event)
    new: bool = False
    error: Exception | None = None


class WebhookIntake:
    def __init__(self, pool: asyncpg.Pool, inbox: WebhookInbox) -> None:
        """Events go into `inbox`'s table; its handler's batch runs in the group's transaction,
        and the inbox worker is woken for what is left."""
        self._pool = pool
        self._inbox = inbox
        self._queue: list[_Waiting] = []
        self._arrived = anyio.Event()
        self._running = False
        # Events stored but whose group is not yet written and announced; `_idle` is set
        # while there are none: what the provisioning runner waits for.
        self._unsettled = 0
        self._idle = anyio.Event()
        self._idle.set()

    @property
    def running(self) -> bool:
        return self._running

    async def store(self, event: VerifiedEvent) -> bool:
        """Answers, once the event is committed, whether it is new (not a redelivery)."""
        if not self._running:
            raise IntakeNotRunning("the webhook intake is not running")
        waiting = _Waiting(event)
        if self._idle.is_set():
            self._idle = anyio.Event()
        self._unsettled += 1
        self._queue.append(waiting)
        self._arrived.set()
        await waiting.done.wait()
        if waiting.error is not None:
            raise waiting.error
        return waiting.new

    async def quiet(self) -> None:
        """Returns once every event stored is written and announced: provisioning steps give
        way to a burst of webhooks (`provisioning.Foreground`)."""
        while True:
            idle = self._idle
            await idle.wait()
            # Requests already received store their events before this answers.
            await anyio.lowlevel.checkpoint()
            if self._idle is idle:
                return

    async def run(self) -> None:
        """Writes the queued events, group after group, until cancelled. Each group is
        announced (`Batch.after_commit`) by a second task, in order, while the next one is
        written: a write need not wait for Redis, nor a slow Redis hold up the webhooks."""
        self._running = True
        announce, announcements = anyio.create_memory_object_stream[_Announcement](math.inf)
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
                        group, self._queue = self._queue[:BATCH], self._queue[BATCH:]
                        try:
                            announce.send_nowait(await self._write(group))
                        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                            # Its requests answer 503 and Stripe delivers them again.
                            logger.exception("webhook group of %d not stored", len(group))
                            self._settle(len(group))
        finally:
            self._running = False
            self._idle.set()
            for waiting in self._queue:
                waiting.error = IntakeNotRunning("the server is shutting down")
                waiting.done.set()

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
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            logger.warning("webhook intake not warmed up (%s); its first group will be slower", exc)

    async def _announce_in_order(
        self, announcements: MemoryObjectReceiveStream[_Announcement]
    ) -> None:
        async for announcement in announcements:
            try:
                if announcement.batch.after_commit is not None:
                    await announcement.batch.after_commit()
                if announcement.left_for_the_worker:
                    self._inbox.wake()
            finally:
                self._settle(announcement.events)

    def _settle(self, events: int) -> None:
        self._unsettled -= events
        if self._unsettled == 0:
            self._idle.set()

    async def _write(self, group: Sequence[_Waiting]) -> _Announcement:
        try:
            try:
                new, batch = await self._write_together(group, handle=True)
            except _UNSTORABLE:
                new, batch = await self._write_one_by_one(group), Batch()
            except Exception:
                # The request boundary of a whole group: store them, fulfil them later.
                logger.exception("webhook group of %d not handled together", len(group))
                new, batch = await self._write_together(group, handle=False)
        except Exception as exc:
            for waiting in group:
                waiting.error = exc
            raise
        finally:
            for waiting in group:
                waiting.done.set()
        return _Announcement(batch, bool(new - batch.handled), len(group))

    async def _write_together(
        self, group: Sequence[_Waiting], *, handle: bool
    ) -> tuple[set[str], Batch]:
        """Answers the ids that were new, and what the batch handler did with them."""
        verified = _first_of_each(group)
        events = [_inbox_event(e) for e in verified]
        batch = Batch()
        if not (handle and self._inbox.any_batchable(events)):
            # Nothing to fulfil here: one statement, its own transaction.
            async with self._pool.acquire() as conn:
                new = await store_events(conn, verified)
        else:
            async with self._pool.acquire() as conn, conn.transaction():
                new = await store_events(conn, verified)
                batch = await self._inbox.handle_together(conn, [e for e in events if e.id in new])
        _answer(group, new)
        return new, batch

    async def _write_one_by_one(self, group: Sequence[_Waiting]) -> set[str]:
        """One event of the group cannot be stored: store the others, refuse that one."""
        new: set[str] = set()
        for event in _first_of_each(group):
            try:
                async with self._pool.acquire() as conn:
                    new |= await store_events(conn, [event])
            except _UNSTORABLE:
                for waiting in group:
                    if waiting.event.id == event.id:
                        waiting.error = EventNotStorable(event.id)
        _answer(group, new)
        return new


def _first_of_each(group: Sequence[_Waiting]) -> list[VerifiedEvent]:
    events: dict[str, VerifiedEvent] = {}
    for waiting in group:
        events.setdefault(waiting.event.id, waiting.event)
    return list(events.values())


def _answer(group: Sequence[_Waiting], new: set[str]) -> None:
    # Only the first delivery of an id in the group counts as new.
    answered: set[str] = set()
    for waiting in group:
        waiting.new = waiting.event.id in new and waiting.event.id not in answered
        answered.add(waiting.event.id)


def _inbox_event(event: VerifiedEvent) -> InboxEvent:
    return InboxEvent(
        id=event.id, type=event.type, created=event.created, payload=event.payload, attempts=1
    )
