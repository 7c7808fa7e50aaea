"""Leases on operations: release, claiming those of dead instances (`LeaseKeeper` renews
them), and the advisory lock that tells the other instances this one is alive.

An operation is taken over when its lease expired, or at once when its owner's instance lock
is free: a session-level advisory lock that PostgreSQL releases the moment the owner's
connection drops, so work left by a killed process resumes within a sweep (about 1 s) instead
of a whole lease. A stopped or partitioned process keeps its lock (its connection stays
open): for it the lease expiry remains the fallback, and ``operations.hold_lease`` fences its
side effects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import anyio
import asyncpg
from anyio.abc import TaskStatus

from .errors import DATABASE_ERRORS
from .operations import Connection, OperationRecord, lease_until

__all__ = [
    "INSTANCE_LOCK_CLASS",
    "InstanceLock",
    "claim_expired",
    "claim_operation",
    "hand_over",
    "instance_gone",
    "release_lease",
    "release_quietly",
]

logger = logging.getLogger(__name__)


async def release_lease(
    conn: Connection, op_id: str, owner: str, *, retry_after: float = 0.0
) -> None:
    """Lets any instance take the operation up again after ``retry_after`` seconds."""
    await conn.execute(
        f"UPDATE operations SET lease_expires_at = {lease_until(3)},"
        " updated_at = now() WHERE id = $1 AND lease_owner = $2",
        op_id,
        owner,
        retry_after,
    )


async def hand_over(conn: Connection, op_id: str, owner: str) -> None:
    """Gives an operation announced but not yet begun to whichever instance claims it next.

    Marked started, so that the next instance does not announce it again (it audits
    ``operation.resumed``, as after a crash); unowned, so that a renewal of ``owner``'s leases
    already under way cannot keep it here for another lease."""
    await conn.execute(
        "UPDATE operations SET lease_owner = NULL, lease_expires_at = now(),"
        " started_at = coalesce(started_at, now()), updated_at = now()"
        " WHERE id = $1 AND lease_owner = $2",
        op_id,
        owner,
    )


# The first key of every instance lock, (INSTANCE_LOCK_CLASS, hashtext(instance id)): two int4
# keys, a space apart from the bigint keys of the migrations' lock. Any number works, the
# same everywhere.
INSTANCE_LOCK_CLASS = 0x4C6B6F70


def instance_gone(owner_column: str, class_param: int) -> str:
    """SQL that is true when the instance named in ``owner_column`` holds no instance lock
    (``$class_param`` is ``INSTANCE_LOCK_CLASS``): its process died, or lost its connection.

    For any table whose rows an instance claims (the webhook inbox could use it too): a row
    whose owner is gone can be claimed at once, without waiting for its lock time.
    """
    return f"""hashtext({owner_column})::oid NOT IN (
        SELECT objid FROM pg_locks
        WHERE locktype = 'advisory' AND classid = ${class_param}::oid AND objsubid = 2
          AND granted
          AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))"""


_CLAIM = f"""
WITH claimable AS (
    SELECT id FROM operations
    WHERE finalized_at IS NULL
      AND (lease_expires_at IS NULL OR lease_expires_at < now()
           OR {instance_gone("lease_owner", 5)})
      AND ($3::text IS NULL OR id = $3)
    ORDER BY created_at
    LIMIT $4
    FOR UPDATE SKIP LOCKED
)
UPDATE operations o SET lease_owner = $1, lease_expires_at = {lease_until(2)},
    attempts = o.attempts + CASE WHEN o.finished_at IS NULL THEN 1 ELSE 0 END,
    updated_at = now()
FROM claimable WHERE o.id = claimable.id
RETURNING o.*
"""


async def claim_expired(
    conn: Connection, owner: str, lease_seconds: float, limit: int
) -> Sequence[OperationRecord]:
    """Takes up to ``limit`` unfinished operations whose lease expired or whose owner's
    instance lock is free (oldest first)."""
    rows = await conn.fetch(_CLAIM, owner, lease_seconds, None, limit, INSTANCE_LOCK_CLASS)
    return [OperationRecord.from_row(r) for r in rows]


async def claim_operation(
    conn: Connection, op_id: str, owner: str, lease_seconds: float
) -> OperationRecord | None:
    """Takes this one operation if its lease expired or its owner is gone."""
    row = await conn.fetchrow(_CLAIM, owner, lease_seconds, op_id, 1, INSTANCE_LOCK_CLASS)
    return None if row is None else OperationRecord.from_row(row)


async def release_quietly(
    pool: asyncpg.Pool, op_id: str, owner: str, retry_after: float, *, handing_over: bool = False
) -> None:
    """``release_lease`` (``hand_over`` with ``handing_over``) within 2 s, even while being
    cancelled; failures are only logged (the lease then expires)."""
    with anyio.move_on_after(2, shield=True):
        try:
            async with pool.acquire() as conn:
                if handing_over:
                    await hand_over(conn, op_id, owner)
                else:
                    await release_lease(conn, op_id, owner, retry_after=retry_after)
        except Exception as exc:
            logger.warning("operation %s: lease not released (%s)", op_id, type(exc).__name__)


class InstanceLock:
    """Holds this instance's advisory lock on a connection of its own while ``run`` serves.

    The connection is checked every ``check_interval`` seconds; when it drops (the server
    restarted, a network blip) the lock is taken again on a new one. In between, the other
    instances may take this one's operations over, which the lease fences make safe.
    """

    def __init__(self, pool: asyncpg.Pool, owner: str, *, check_interval: float = 1.0) -> None:
        self._pool = pool
        self._owner = owner
        self._interval = check_interval
        self.held = False

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serves until cancelled; ready once the first attempt to lock succeeded or failed."""
        started = False

        def ready() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        while True:
            try:
                async with self._pool.acquire(timeout=max(1.0, self._interval)) as conn:
                    await self._hold(conn, ready)
            except DATABASE_ERRORS as exc:
                logger.warning(
                    "instance lock of %s lost (%s); taking it again",
                    self._owner,
                    type(exc).__name__,
                )
            finally:
                self.held = False
            ready()
            await anyio.sleep(self._interval)

    async def _hold(self, conn: Connection, ready: Callable[[], None]) -> None:
        self.held = bool(
            await conn.fetchval(
                "SELECT pg_try_advisory_lock($1, hashtext($2))", INSTANCE_LOCK_CLASS, self._owner
            )
        )
        if not self.held:
            # Another live session has the same key (a hash collision): this instance's
            # operations are then taken over after their lease expires, no sooner.
            logger.warning("instance lock of %s is held elsewhere", self._owner)
        try:
            ready()
            while True:
                await anyio.sleep(self._interval)
                await conn.fetchval("SELECT 1", timeout=max(1.0, self._interval))
        finally:
            if self.held:
                # The pool keeps session state (app.db), so the lock must go before the
                # connection returns to it; a connection that cannot say so is closed.
                unlocked = False
                with anyio.move_on_after(2, shield=True):
                    try:
                        await conn.execute(
                            "SELECT pg_advisory_unlock($1, hashtext($2))",
                            INSTANCE_LOCK_CLASS,
                            self._owner,
                        )
                        unlocked = True
                    except DATABASE_ERRORS:
                        pass
                if not unlocked:
                    conn.terminate()
