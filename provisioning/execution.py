"""Running one operation's steps, concluding it, and reporting its outcome exactly once."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any, Final, Literal, cast

import anyio
import asyncpg

from streams import Event, EventPublisher, isoformat_z, operation_topic, user_topic

from . import operations as ops
from .backend import CHANGE_KINDS, ProvisionerBackend, Step, StepContext
from .errors import LeaseLost, ProvisioningError, is_transient
from .hooks import SubscriptionHooks
from .operations import OperationRecord
from .retry import RetryPolicy

__all__ = ["TERMINAL_EVENT_TYPES", "Executor", "Outcome"]

logger = logging.getLogger(__name__)

# An operation's last event, `operation.<its terminal status>` (docs/API.md, Server-Sent
# Events): the event hub and publisher are told so, and end an operation's stream after it.
TERMINAL_EVENT_TYPES: Final = frozenset(f"operation.{s}" for s in ops.TERMINAL_STATUSES)

_NOUNS = {"graph": "graph", "repository": "repository access"}


def _noun(op: OperationRecord) -> str:
    return _NOUNS.get(op.resource_type, op.resource_type)


@dataclass(frozen=True, slots=True)
class Outcome:
    status: Literal["completed", "failed", "cancelled"]
    error: str | None = None


class _CancelRequested(Exception):
    """A cancellation was requested (from any instance): the provision stops before its next
    side effect."""


class Executor:
    """The work of one instance on operations it holds the lease of.

    Every write is fenced by the lease (``lease_owner = instance``): when another instance
    took the operation over, the write matches nothing and ``LeaseLost`` stops this one. Every
    side effect on the provisioning server (a step, a rollback) runs inside a transaction that
    first checks the lease and keeps the operation's row locked until the step is recorded
    (``operations.hold_lease``): a process that stalled past its lease and woke up after
    another took over finds the lease gone and does nothing.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        publisher: EventPublisher,
        hooks: SubscriptionHooks,
        *,
        owner: str,
        retry: RetryPolicy,
        lease_seconds: float = 15.0,
    ) -> None:
        self._pool = pool
        self._publisher = publisher
        self._hooks = hooks
        self._owner = owner
        self._retry = retry
        # A pool that has no connection to give within this is as good as down: the caller
        # gives up and the lease keeper's view decides, instead of waiting forever.
        self._acquire_timeout = max(1.0, min(5.0, lease_seconds / 3))

    def _acquire(self) -> AbstractAsyncContextManager[ops.Connection]:
        return cast(
            "AbstractAsyncContextManager[ops.Connection]",
            self._pool.acquire(timeout=self._acquire_timeout),
        )

    async def _fenced(self, query: Callable[[ops.Connection], Awaitable[bool]]) -> None:
        async with self._acquire() as conn:
            if not await query(conn):
                raise LeaseLost("another instance holds this operation's lease")

    async def publish(self, op: OperationRecord, type_: str, **fields: Any) -> None:
        """Publishes to the operation's and the user's topics; raises when Redis stays away."""
        event, topics = _addressed(op, type_, **fields)
        await self._retry.call(
            partial(self._publisher.publish, event, topics), what=f"publishing {type_}"
        )

    async def _publish_progress(self, op: OperationRecord, type_: str, **fields: Any) -> None:
        # The table is the truth and the stream a view of it: a lost progress event must not
        # stop the work.
        try:
            await self.publish(op, type_, **fields)
        except Exception as exc:
            logger.warning("operation %s: %s not published (%s)", op.id, type_, type(exc).__name__)

    async def audit(self, kind: str, op: OperationRecord, **detail: Any) -> None:
        try:
            await self._hooks.audit(
                kind,
                subject_id=op.subject_id,
                user_id=op.user_id,
                detail={**op.audit_detail(), **detail},
            )
        except Exception:
            logger.exception("operation %s: audit of %s failed", op.id, kind)

    async def announce_start(self, op: OperationRecord) -> None:
        """``operation.started``, once: ``started_at`` records it with the first step (one write
        fewer while many start at once), or when the operation is handed over to another
        instance for want of a slot; a crash before either publishes it again."""
        if op.started_at is not None:
            await self.audit("operation.resumed", op, attempts=op.attempts, step=op.step)
            return
        await self._publish_progress(
            op, "operation.started", step=None, progress=0, message=_started_message(op)
        )
        await self.audit("operation.started", op)

    async def announce_many(
        self,
        ops: Sequence[OperationRecord],
        *,
        along: Sequence[tuple[Event, Iterable[str]]] = (),
    ) -> None:
        """``operation.started`` of many new operations, then ``along``, in one round trip."""
        items = [*(_started(op) for op in ops), *along]
        if not items:
            return
        try:
            await self._retry.call(
                partial(self._publisher.publish_many, items),
                what=f"publishing {len(ops)} operation.started",
            )
        except Exception as exc:
            # As a lost progress event: the tables are the truth, snapshots show it.
            logger.warning("%d events not published (%s)", len(items), type(exc).__name__)

    async def run_steps(self, op: OperationRecord, steps: Sequence[Step]) -> Outcome:
        """Runs the steps not yet completed, in order; each transient error is retried, and
        an unreachable server is waited out (``operation.waiting``) for the retry window."""
        ctx = StepContext(op.id, op.kind, op.subject_id, op.user_id, op.resource_id, op.spec)

        def following(index: int) -> tuple[str, int] | None:
            """The next step to run after ``steps[index]``, and its progress (asked once
            that step has run: whether a later one is needed may follow from it)."""
            for later in range(index + 1, len(steps)):
                step = steps[later]
                if step.name not in op.completed_steps and (
                    step.needed is None or step.needed(ctx)
                ):
                    return step.name, later * 100 // len(steps)
            return None

        # The step the previous one's completion recorded as begun (one write fewer each).
        begun_by_previous: str | None = None
        for index, step in enumerate(steps):
            if step.name in op.completed_steps:
                continue
            if step.needed is not None and not step.needed(ctx):
                continue
            progress = index * 100 // len(steps)
            if begun_by_previous != step.name:
                async with self._acquire() as conn:
                    begun = await ops.begin_step(conn, op.id, self._owner, step.name, progress)
                if begun == "lease_lost":
                    raise LeaseLost("another instance holds this operation's lease")
                if begun == "cancel_requested":
                    logger.info("operation %s: cancelled before step %s", op.id, step.name)
                    return Outcome("cancelled")
            # Otherwise the lease and a cancellation are read by the step's own transaction
            # (hold_lease), before anything is done: a provision asked to stop begins nothing.
            await self._publish_progress(
                op, "operation.progress", step=step.name, progress=progress, message=step.message
            )
            try:
                error, begun_by_previous = await self._run_step(
                    op, step, ctx, progress, partial(following, index)
                )
            except _CancelRequested:
                logger.info("operation %s: cancelled before step %s ran", op.id, step.name)
                return Outcome("cancelled")
            if isinstance(error, ProvisioningError):
                return Outcome("failed", error.customer_message + self._consequence(op))
            if error is not None:
                return Outcome("failed", self._failure_sentence(op, step, error))
        return Outcome("completed")

    async def _run_step(
        self,
        op: OperationRecord,
        step: Step,
        ctx: StepContext,
        progress: int,
        following: Callable[[], tuple[str, int] | None],
    ) -> tuple[Exception | None, str | None]:
        """Runs one step under the lease until it succeeds (None) or fails for good (its
        error). Errors of Lookout's own database propagate: the operation is resumed later.
        Its completion records the beginning of the ``following`` step, named in the answer."""
        failures = waits = 0
        while True:
            after: tuple[str, int] | None = None
            async with self._acquire() as conn, conn.transaction():
                held = await ops.hold_lease(conn, op.id, self._owner)
                if held == "lease_lost":
                    raise LeaseLost("another instance holds this operation's lease")
                if held == "cancel_requested":
                    raise _CancelRequested(op.id)
                try:
                    await step.run(ctx)
                except Exception as exc:
                    error: Exception | None = exc
                else:
                    error = None
                    after = following()
                    if after is None:
                        completed = await ops.complete_step(conn, op.id, self._owner, step.name)
                    else:
                        begun = await ops.complete_and_begin(
                            conn, op.id, self._owner, step.name, *after
                        )
                        completed = begun != "lease_lost"
                        if begun == "cancel_requested":
                            after = None  # not begun: the next step's begin_step stops
                    if not completed:
                        raise LeaseLost("another instance holds this operation's lease")
            if error is None:
                if waits:
                    logger.info("operation %s: the server answers again", op.id)
                    await self._publish_progress(
                        op,
                        "operation.progress",
                        step=step.name,
                        progress=progress,
                        message=step.message,
                    )
                return None, after[0] if after is not None else None
            if not is_transient(error):
                return error, None
            failures += 1
            if failures < self._retry.attempts:
                delay = self._retry.delay(failures)
                logger.warning(
                    "transient %s in %s %s (attempt %d); retrying in %.2fs",
                    type(error).__name__,
                    op.id,
                    step.name,
                    failures,
                    delay,
                )
            else:
                waits += 1
                wait = await self._wait(op, step, progress, waits)
                if wait is None:
                    return error, None
                delay = wait
            await anyio.sleep(delay)

    async def _wait(
        self, op: OperationRecord, step: Step, progress: int, waits: int
    ) -> float | None:
        """Marks the operation ``waiting`` and says when it tries again; None once it has
        waited for the whole retry window (since the outage began, on whichever instance)."""
        if self._retry.outage_window <= 0:
            return None
        delay = self._retry.outage_delay(waits)
        async with self._acquire() as conn:
            waiting = await ops.set_waiting(conn, op.id, self._owner, delay)
        if waiting is None:
            raise LeaseLost("another instance holds this operation's lease")
        assert waiting.waiting_since is not None and waiting.retry_at is not None
        waited = (waiting.updated_at - waiting.waiting_since).total_seconds()
        left = self._retry.outage_window - waited
        if left <= 0:
            logger.warning(
                "operation %s: the server did not answer for %.0fs; giving up", op.id, waited
            )
            return None
        delay = min(delay, left)
        retry_at = waiting.updated_at + timedelta(seconds=delay)
        logger.warning(
            "operation %s: the server does not answer (step %s); retrying in %.1fs",
            op.id,
            step.name,
            delay,
        )
        await self._publish_progress(
            op,
            "operation.waiting",
            status="waiting",
            step=step.name,
            progress=progress,
            retry_at=isoformat_z(retry_at),
            message=(
                f"The database server is not answering; retrying in {max(1, math.ceil(delay))} s"
            ),
        )
        return delay

    def _failure_sentence(self, op: OperationRecord, step: Step, exc: Exception) -> str:
        after = self._consequence(op)
        doing = _VERBS[op.kind][2]
        if is_transient(exc):
            logger.warning(
                "operation %s: step %s gave up after retries (%s)",
                op.id,
                step.name,
                type(exc).__name__,
            )
            return (
                f"The server that hosts your {_noun(op)} could not be reached, so it could not"
                f" be {doing}.{after}"
            )
        logger.error("operation %s: step %s failed", op.id, step.name, exc_info=exc)
        return f"An unexpected error stopped your {_noun(op)} from being {doing}.{after}"

    async def conclude(
        self, op: OperationRecord, outcome: Outcome, backend: ProvisionerBackend
    ) -> OperationRecord:
        """Rolls back a provision that did not complete, then records and reports the outcome."""
        resource_status: str | None
        if op.kind in CHANGE_KINDS:
            # The resource stays; only what its login may do changed (or did not).
            resource_status = _CHANGED_STATUS[op.kind] if outcome.status == "completed" else None
        elif outcome.status == "completed":
            resource_status = "active" if op.kind == "provision" else "deleted"
        else:
            resource_status = "orphaned" if op.kind == "deprovision" else "deleted"
        finished: OperationRecord | None = None
        if op.kind == "provision" and outcome.status != "completed":
            finished = await self._roll_back(op, outcome, backend)
            resource_status = "deleted" if finished is not None else "orphaned"
        if finished is None:
            async with self._acquire() as conn:
                finished = await self._finish(conn, op, outcome, resource_status)
        await self.audit(
            f"operation.{finished.status}",
            finished,
            error=finished.error,
            attempts=finished.attempts,
            resource_status=resource_status,
        )
        return finished

    async def _roll_back(
        self, op: OperationRecord, outcome: Outcome, backend: ProvisionerBackend
    ) -> OperationRecord | None:
        """Tears down what the provision created and records the outcome, in one transaction
        that holds the lease (a stalled instance cannot drop what another one completed
        since). None when the teardown failed: the resource is left for the reaper."""
        failures = 0
        while True:
            async with self._acquire() as conn, conn.transaction():
                held = await ops.hold_lease(conn, op.id, self._owner)
                if held == "lease_lost":
                    raise LeaseLost("another instance holds this operation's lease")
                try:
                    await backend.teardown(op.resource_id)
                except Exception as exc:
                    error = exc
                else:
                    return await self._finish(conn, op, outcome, "deleted")
            failures += 1
            if not is_transient(error) or failures >= self._retry.attempts:
                logger.error("operation %s: rollback failed (%s)", op.id, type(error).__name__)
                await self.audit("operation.rollback_failed", op, error_type=type(error).__name__)
                return None
            delay = self._retry.delay(failures)
            logger.warning(
                "transient %s in %s rollback (attempt %d); retrying in %.2fs",
                type(error).__name__,
                op.id,
                failures,
                delay,
            )
            await anyio.sleep(delay)

    async def _finish(
        self,
        conn: ops.Connection,
        op: OperationRecord,
        outcome: Outcome,
        resource_status: str | None,
    ) -> OperationRecord:
        result = (
            {
                "resource_type": op.resource_type,
                "resource_id": op.resource_id,
                "plan": op.spec.plan_name,
            }
            if outcome.status == "completed"
            else None
        )
        finished = await ops.finish_operation(
            conn,
            op.id,
            self._owner,
            outcome.status,
            resource_status=resource_status,
            error=outcome.error if outcome.status == "failed" else None,
            result=result,
            resource_plan=(
                op.spec.plan_name if op.kind == "resize" and outcome.status == "completed" else None
            ),
        )
        if finished is None:
            raise LeaseLost("another instance holds this operation's lease")
        return finished

    async def finalize(self, op: OperationRecord) -> bool:
        """Tells the hooks, then publishes the terminal event; True when both are done."""
        reported = op.reported_at is not None
        if not reported:
            # Only the lease holder tells the hooks: a stalled instance must not repeat what
            # the instance that took over has done.
            await self._fenced(partial(ops.holds_lease, op_id=op.id, owner=self._owner))
            try:
                await self._report(op)
                reported = True
            except Exception as exc:
                logger.exception("operation %s: subscription hook failed; retried later", op.id)
                await self.audit("operation.hook_failed", op, error_type=type(exc).__name__)
        announced = op.announced_at is not None
        if not announced:
            try:
                await self.publish(op, f"operation.{op.status}", **self._terminal_fields(op))
                announced = True
            except Exception as exc:
                logger.warning(
                    "operation %s: terminal event not published (%s); retried later",
                    op.id,
                    type(exc).__name__,
                )
        async with self._acquire() as conn:
            marked = await ops.mark_outcome(
                conn, op.id, self._owner, reported=reported, announced=announced
            )
        if marked is None:
            raise LeaseLost("another instance holds this operation's lease")
        return marked.finalized_at is not None

    async def _report(self, op: OperationRecord) -> None:
        if op.kind != "provision":
            return
        if op.status == "completed":
            await self._hooks.provisioning_succeeded(op)
        else:
            await self._hooks.provisioning_failed(op, op.error or self._cancelled_sentence(op))

    def _consequence(self, op: OperationRecord) -> str:
        # What the layer above does when a provision fails (billing cancels the subscription),
        # in its own words.
        note = self._hooks.provision_failed_note
        return f" {note}" if note and op.kind == "provision" else ""

    def _cancelled_sentence(self, op: OperationRecord) -> str:
        return (
            f"The set-up of your {_noun(op)} was cancelled and everything it had created was"
            f" removed.{self._consequence(op)}"
        )

    def _terminal_fields(self, op: OperationRecord) -> Mapping[str, Any]:
        fields: dict[str, Any] = {"status": op.status, "step": op.step, "progress": op.progress}
        if op.status == "completed":
            done = _VERBS[op.kind][1]
            fields.update(message=f"Your {_noun(op)} {done}", result=dict(op.result or {}))
        elif op.status == "failed":
            fields.update(message=op.error, error=op.error)
        else:
            fields.update(message=self._cancelled_sentence(op))
        return fields


def _addressed(op: OperationRecord, type_: str, **fields: Any) -> tuple[Event, list[str]]:
    event = Event.create(
        type_,
        operation_id=op.id,
        kind=op.kind,
        resource_type=op.resource_type,
        resource_id=op.resource_id,
        **fields,
    )
    return event, [operation_topic(op.id), user_topic(op.user_id)]


# Per kind: what is under way, what is done, and "could not be <...>".
_VERBS: Mapping[str, tuple[str, str, str]] = {
    "provision": ("Setting up", "is ready", "set up"),
    "deprovision": ("Removing", "was removed", "removed"),
    "resize": ("Resizing", "follows your new plan", "resized"),
    "suspend": ("Suspending", "was suspended", "suspended"),
    "resume": ("Restoring", "is available again", "restored"),
}
# A change's resource status once it completed (None: as it was).
_CHANGED_STATUS: Mapping[str, str | None] = {
    "resize": None,
    "suspend": "suspended",
    "resume": "active",
}


def _started_message(op: OperationRecord) -> str:
    return f"{_VERBS[op.kind][0]} your {_noun(op)}"


def _started(op: OperationRecord) -> tuple[Event, list[str]]:
    return _addressed(op, "operation.started", step=None, progress=0, message=_started_message(op))
