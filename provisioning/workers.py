"""The operations one process works on: a task each, its lease kept, its steps run in one of
a bounded number of slots, its outcome concluded and reported. An operation that finds no
slot free soon gives its lease up, for whichever instance has room to claim it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio
import asyncpg
from anyio.abc import TaskGroup

from . import leases
from . import operations as ops
from .backend import CHANGE_KINDS, ProvisionerBackend, Step
from .errors import LeaseLost, is_transient
from .execution import Executor, Outcome
from .foreground import Foreground, give_way
from .lease_keeper import LeaseKeeper
from .limits import check_limits_step
from .operations import OperationRecord
from .pgadmin import AdminConnections, reusing_connections

__all__ = ["OperationTask", "Workers"]

logger = logging.getLogger(__name__)

# How often a change waiting for its turn looks again (a few cheap reads a second).
TURN_POLL_SECONDS = 0.2

# How long an operation waits for one of this instance's slots before it gives its lease up
# (``leases.hand_over``) for any instance with room, which claims it at its next sweep (about
# a second): a burst taken by one instance then spreads over the idle ones instead of queueing
# behind its slots. Short next to the steps of a provision (seconds), long enough that an
# operation coming just after a slot's last one does not leave for nothing.
SLOT_WAIT_SECONDS = 0.75


@dataclass(eq=False)
class OperationTask:
    """This process's handle on one operation it works on."""

    steps_scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)
    cancel_requested: bool = False
    announced: bool = False

    def cancel(self) -> None:
        self.cancel_requested = True
        self.steps_scope.cancel()


class Workers:
    """Runs each operation it is given in a task of the runner's task group."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        executor: Executor,
        leases: LeaseKeeper,
        backend: Callable[[str], ProvisionerBackend],
        *,
        owner: str,
        max_concurrent: int,
        finalize_retry: float,
        give_way_to: Foreground | None,
        give_way_seconds: float,
        admin: AdminConnections | None = None,
    ) -> None:
        self._pool = pool
        self._admin = admin
        self._exec = executor
        self._leases = leases
        self._backend = backend
        self._owner = owner
        self._max_concurrent = max_concurrent
        self._finalize_retry = finalize_retry
        self._give_way_to = give_way_to
        self._give_way_seconds = give_way_seconds
        self._limiter = anyio.CapacityLimiter(max_concurrent)
        self._tasks: dict[str, OperationTask] = {}
        self._idle = anyio.Event()
        self._idle.set()
        # Set when an operation of this instance was handed over and may not be claimed yet:
        # a slot freeing up here then wakes the sweep at once (``slot_freed``), so that a
        # burst on a single instance runs as fast as when its operations queued for a slot.
        self._handed_over = False
        self._freed = anyio.Event()

    @property
    def active(self) -> frozenset[str]:
        return frozenset(self._tasks)

    @property
    def room(self) -> int:
        """How many more operations could run their steps now: every task counts, holding a
        slot or about to take one, so this never exceeds the slots free. An instance at
        capacity thus claims none, not even one it just handed over."""
        return self._max_concurrent - len(self._tasks)

    def swept(self, *, all_claimed: bool) -> None:
        """A sweep claimed what there was room for; ``all_claimed``: nothing was left."""
        if all_claimed:
            self._handed_over = False

    async def slot_freed(self) -> None:
        """Returns once a task ended while an operation handed over may still wait."""
        await self._freed.wait()
        self._freed = anyio.Event()

    def get(self, op_id: str) -> OperationTask | None:
        return self._tasks.get(op_id)

    async def quiet(self) -> None:
        """Returns once this process works on no operation (what background work that can
        wait, the warm pool's refill, gives way to)."""
        while self._tasks:
            await self._idle.wait()

    def spawn(
        self, tg: TaskGroup, op: OperationRecord, *, announced: bool = False
    ) -> OperationTask:
        """The operation's task, started in ``tg`` unless it already runs here."""
        task = self._tasks.get(op.id)
        if task is not None:
            return task
        if not self._tasks:
            self._idle = anyio.Event()
        task = self._tasks[op.id] = OperationTask(announced=announced)
        tg.start_soon(self._execute, op, task, name=f"operation {op.id}")
        return task

    def _steps(self, op: OperationRecord, backend: ProvisionerBackend) -> Sequence[Step]:
        if op.kind == "provision":
            return (check_limits_step(self._pool), *backend.steps("provision"))
        return tuple(backend.steps(op.kind))

    async def _wait_turn(self, op: OperationRecord) -> None:
        """A change of a resource waits, leased and pending, until every operation of its
        subject created before it has finished: a resume decided after a suspend must not
        run first, on this instance or another."""
        while True:
            async with self._pool.acquire() as conn:
                if not await ops.earlier_unfinished(conn, op):
                    return
            await anyio.sleep(TURN_POLL_SECONDS)

    async def _execute(self, op: OperationRecord, task: OperationTask) -> None:
        handed_over = False
        try:
            # A lost lease stops the work here: another instance has the operation now.
            with (
                anyio.CancelScope() as lease_scope,
                self._leases.keeping(
                    op.id, on_cancel_requested=task.cancel, on_lost=lease_scope.cancel
                ),
            ):
                try:
                    handed_over = not await self._process(op, task)
                except LeaseLost:
                    logger.warning("operation %s: another instance took it over", op.id)
                except Exception as exc:
                    if is_transient(exc):
                        # Lookout's own database away: one line each, not a traceback per
                        # operation for as long as the outage lasts.
                        logger.warning("operation %s stopped (%r); it resumes later", op.id, exc)
                    else:
                        logger.exception("operation %s stopped; it resumes later", op.id)
                    await self._release(op.id, self._finalize_retry)
            if handed_over:
                # No longer kept (a renewal after this would hold it here again).
                logger.info("operation %s: no slot free here; handed over", op.id)
                await leases.release_quietly(self._pool, op.id, self._owner, 0.0, handing_over=True)
                self._handed_over = True
        except anyio.get_cancelled_exc_class():
            # Shutting down: let the next instance (or this one, restarted) resume it at once.
            await self._release(op.id, 0.0)
            raise
        finally:
            self._tasks.pop(op.id, None)
            if not self._tasks:
                self._idle.set()
            if self._handed_over and not handed_over:
                self._freed.set()
            task.done.set()

    async def _release(self, op_id: str, retry_after: float) -> None:
        await leases.release_quietly(self._pool, op_id, self._owner, retry_after)

    async def _process(self, op: OperationRecord, task: OperationTask) -> bool:
        """Runs the operation to its end; False when it found no slot and must be handed over
        (announced, but nothing else done)."""
        backend = self._backend(op.resource_type)
        if op.finished_at is None:
            if op.cancel_requested:
                task.cancel()
            if not task.announced:
                await self._exec.announce_start(op)
            outcome: Outcome | None = None
            if op.kind in CHANGE_KINDS:
                await self._wait_turn(op)
            # A cancellation also stops the wait for a slot: rolling back needs none.
            with task.steps_scope:
                slot = False
                with anyio.move_on_after(SLOT_WAIT_SECONDS):
                    await self._limiter.acquire()
                    slot = True
                if slot:
                    try:
                        await give_way(self._give_way_to, at_most=self._give_way_seconds)
                        # The steps share their admin connections, per server, taken from
                        # and given back to those this process keeps open.
                        async with reusing_connections(self._admin):
                            outcome = await self._exec.run_steps(op, self._steps(op, backend))
                    finally:
                        self._limiter.release()
                elif not task.cancel_requested:
                    return False
            op = await self._exec.conclude(op, outcome or Outcome("cancelled"), backend)
        if not await self._exec.finalize(op):
            await self._release(op.id, self._finalize_retry)
        return True
