"""Queries over the operations table (connection first, ``$n`` parameters)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from .backend import OperationKind, ResourceSpec

__all__ = [
    "TERMINAL_STATUSES",
    "Connection",
    "OperationRecord",
    "OperationStatus",
    "StepStart",
    "begin_step",
    "complete_step",
    "create_change",
    "create_operation",
    "earlier_unfinished",
    "finish_operation",
    "get_operation",
    "get_operation_for_subject",
    "hold_lease",
    "holds_lease",
    "jsonb_text",
    "lease_until",
    "mark_outcome",
    "mark_started",
    "operation_counts",
    "operation_durations",
    "request_cancel",
    "set_waiting",
]

# A plain connection or one from a pool: query functions take either.
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"
# `waiting`: the provisioning server does not answer; the operation retries until it does or
# until the retry window has passed.
OperationStatus = Literal["pending", "running", "waiting", "completed", "failed", "cancelled"]
TERMINAL_STATUSES: Final = ("completed", "failed", "cancelled")


def jsonb_text(value: Mapping[str, Any] | None) -> str | None:
    # Sent as text and cast in SQL (``$n::text::jsonb``), so that a jsonb codec on the pool,
    # if the app adds one, cannot encode it twice.
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _json_out(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    loaded = json.loads(value) if isinstance(value, str | bytes) else value
    return dict(loaded)


@dataclass(frozen=True, slots=True)
class OperationRecord:
    id: str
    kind: OperationKind
    subject_id: str
    user_id: str
    resource_type: str
    resource_id: str
    spec: ResourceSpec
    status: OperationStatus
    progress: int
    step: str | None
    completed_steps: tuple[str, ...]
    error: str | None
    result: Mapping[str, Any] | None
    attempts: int
    cancel_requested: bool
    lease_owner: str | None
    lease_expires_at: datetime | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    reported_at: datetime | None
    announced_at: datetime | None
    finalized_at: datetime | None
    generation: int = 0  # the subject's n-th operation of this kind (see ``create_operation``)
    waiting_since: datetime | None = None
    retry_at: datetime | None = None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> OperationRecord:
        values = dict(row)
        values["spec"] = ResourceSpec.from_json(_json_out(values["spec"]) or {})
        values["result"] = _json_out(values["result"])
        values["completed_steps"] = tuple(values["completed_steps"])
        return cls(**values)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def audit_detail(self) -> dict[str, Any]:
        """What every audit row about this operation says of it."""
        return {
            "operation_id": self.id,
            "kind": self.kind,
            "resource_type": self.resource_type,
            "resource_id": self.resource_id,
            "plan": self.spec.plan_name,
        }

    def snapshot(self) -> dict[str, Any]:
        """The body of ``GET /v1/operations/{id}`` (docs/API.md, Operations)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "status": self.status,
            "progress": self.progress,
            "step": self.step,
            "error": self.error,
            "result": dict(self.result) if self.result is not None else None,
        }


def _one(row: asyncpg.Record | None) -> OperationRecord | None:
    return None if row is None else OperationRecord.from_row(row)


def lease_until(param: int) -> str:
    """SQL for "now plus parameter ``$param`` seconds"."""
    return f"now() + make_interval(secs => ${param}::float8)"


_CREATE = f"""
WITH op AS (
    INSERT INTO operations (id, kind, subject_id, user_id, resource_type, resource_id, spec,
                            lease_owner, lease_expires_at, attempts, generation)
    VALUES ($1, $2, $3, $4, $5, $6, $7::text::jsonb, $8, {lease_until(9)}, 1, $11)
    ON CONFLICT (kind, subject_id, generation) DO NOTHING
    RETURNING *
), created AS (
    INSERT INTO resources (id, resource_type, user_id, subject_id, plan)
    SELECT resource_id, resource_type, user_id, subject_id, $10 FROM op
    WHERE op.kind = 'provision'
), ending AS (
    UPDATE resources SET status = 'deprovisioning', updated_at = now()
    FROM op WHERE op.kind = 'deprovision' AND resources.id = op.resource_id
    AND resources.status <> 'deleted'
)
SELECT * FROM op
"""


async def create_operation(
    conn: Connection,
    *,
    op_id: str,
    kind: OperationKind,
    subject_id: str,
    user_id: str,
    resource_id: str,
    spec: ResourceSpec,
    lease_owner: str,
    lease_seconds: float,
    generation: int = 0,
) -> tuple[OperationRecord, bool]:
    """Inserts the operation, leased to ``lease_owner``, unless ``(kind, subject_id)`` has one
    of this ``generation`` (0 unless a finished one is followed by another).

    Answers the subject's operation and whether it was created now. A new provision also
    creates its resource row; a new deprovision marks the resource ``deprovisioning``.
    """
    # One statement, so one round trip: starting must take milliseconds.
    row = await conn.fetchrow(
        _CREATE,
        op_id,
        kind,
        subject_id,
        user_id,
        spec.resource_type,
        resource_id,
        jsonb_text(spec.to_json()),
        lease_owner,
        lease_seconds,
        spec.plan_name,
        generation,
    )
    if row is None:
        existing = await get_operation_for_subject(conn, kind, subject_id)
        if existing is None:  # only if it was deleted in between: not by this package
            raise LookupError(f"operation for {kind} {subject_id} vanished; start it again")
        return existing, False
    return OperationRecord.from_row(row), True


_CREATE_CHANGE = f"""
INSERT INTO operations (id, kind, subject_id, user_id, resource_type, resource_id, spec,
                        lease_owner, lease_expires_at, attempts, generation, created_at)
SELECT $1, $2, $3, $4, $5, $6, $7::text::jsonb, $8, {lease_until(9)}, 1,
       coalesce(max(generation) + 1, 0), clock_timestamp()
  FROM operations WHERE kind = $2 AND subject_id = $3
RETURNING *
"""


async def create_change(
    conn: Connection,
    *,
    op_id: str,
    kind: OperationKind,
    subject_id: str,
    user_id: str,
    resource_id: str,
    spec: ResourceSpec,
    lease_owner: str,
    lease_seconds: float,
) -> OperationRecord:
    """Inserts the subject's next ``resize``, ``suspend`` or ``resume`` (the next generation
    of that kind), leased to ``lease_owner``.

    ``created_at`` is the clock at the insert, not the transaction's start: a caller that
    decides under a lock on the subject (its subscription row) creates its operations in the
    order of those decisions, and the runner runs them in that order.
    """
    row = await conn.fetchrow(
        _CREATE_CHANGE,
        op_id,
        kind,
        subject_id,
        user_id,
        spec.resource_type,
        resource_id,
        jsonb_text(spec.to_json()),
        lease_owner,
        lease_seconds,
    )
    assert row is not None  # an INSERT ... SELECT of an aggregate always yields one row
    return OperationRecord.from_row(row)


async def earlier_unfinished(conn: Connection, op: OperationRecord) -> bool:
    """Whether another operation of the same subject, created before ``op``, has not finished:
    changes of one resource run one at a time, in the order they were decided."""
    found = await conn.fetchval(
        "SELECT EXISTS (SELECT FROM operations WHERE subject_id = $1 AND id <> $2"
        " AND finished_at IS NULL AND created_at < $3)",
        op.subject_id,
        op.id,
        op.created_at,
    )
    return bool(found)


async def get_operation(conn: Connection, op_id: str) -> OperationRecord | None:
    return _one(await conn.fetchrow("SELECT * FROM operations WHERE id = $1", op_id))


async def get_operation_for_subject(
    conn: Connection, kind: OperationKind, subject_id: str
) -> OperationRecord | None:
    """The subject's latest operation of ``kind``."""
    row = await conn.fetchrow(
        "SELECT * FROM operations WHERE kind = $1 AND subject_id = $2"
        " ORDER BY generation DESC LIMIT 1",
        kind,
        subject_id,
    )
    return _one(row)


async def mark_started(conn: Connection, op_id: str, owner: str) -> bool:
    """Records that ``operation.started`` went out; False when ``owner`` lost the lease."""
    done = await conn.fetchval(
        "UPDATE operations SET started_at = coalesce(started_at, now()),"
        " updated_at = now() WHERE id = $1 AND lease_owner = $2 AND status IN"
        " ('pending', 'running', 'waiting') RETURNING true",
        op_id,
        owner,
    )
    return bool(done)


StepStart = Literal["begun", "cancel_requested", "lease_lost"]

_BEGIN_STEP = """
WITH current AS (
    SELECT id, cancel_requested, kind FROM operations
    WHERE id = $1 AND lease_owner = $2 AND status IN ('pending', 'running', 'waiting')
), begun AS (
    UPDATE operations o SET status = CASE WHEN o.status = 'waiting' THEN 'waiting'
                                          ELSE 'running' END,
        step = $3, started_at = coalesce(started_at, now()),
        progress = GREATEST(progress, $4), updated_at = now()
    FROM current
    WHERE o.id = current.id AND NOT (current.cancel_requested AND current.kind = 'provision')
    RETURNING o.id
)
SELECT current.cancel_requested AND current.kind = 'provision' AS cancelled FROM current
"""


async def begin_step(
    conn: Connection, op_id: str, owner: str, step: str, progress: int
) -> StepStart:
    """Records that ``step`` begins, unless the lease went to another instance or a
    cancellation was requested (from any instance): both are read in the same statement, so
    a provision asked to stop never begins another step."""
    row = await conn.fetchrow(_BEGIN_STEP, op_id, owner, step, progress)
    if row is None:
        return "lease_lost"
    return "cancel_requested" if row["cancelled"] else "begun"


# The keepalives make the server notice a holder cut off by the network within ~11 s (and
# so release the row); they do not apply over a Unix socket, where that cannot happen.
_HOLD = """
SELECT cancel_requested AND kind = 'provision' AS cancelled,
       set_config('tcp_keepalives_idle', '5', true),
       set_config('tcp_keepalives_interval', '2', true),
       set_config('tcp_keepalives_count', '3', true)
FROM operations
WHERE id = $1 AND lease_owner = $2 AND lease_expires_at > now() AND finished_at IS NULL
FOR KEY SHARE
"""


async def hold_lease(conn: Connection, op_id: str, owner: str) -> StepStart:
    """In the caller's transaction, right before a step's side effects: checks that ``owner``
    still holds an unexpired lease and keeps the row locked until the transaction ends.

    The lock (KEY SHARE: lease renewals and cancellation requests still go through) makes the
    sweeps of other instances (``FOR UPDATE SKIP LOCKED``) pass this operation by while the
    step runs, so no instance takes over work that is under way, even from a process that
    stalls in the middle of it: the holder must wake up (and carry on, its lease renewed, or
    stop at its next step if another instance has the operation by then) or die (and its
    session, and the lock, with it).
    """
    row = await conn.fetchrow(_HOLD, op_id, owner)
    if row is None:
        return "lease_lost"
    return "cancel_requested" if row["cancelled"] else "begun"


async def holds_lease(conn: Connection, op_id: str, owner: str) -> bool:
    held = await conn.fetchval(
        "SELECT true FROM operations WHERE id = $1 AND lease_owner = $2", op_id, owner
    )
    return bool(held)


_COMPLETED = (
    "completed_steps = CASE WHEN $3 = ANY(completed_steps) THEN completed_steps"
    " ELSE array_append(completed_steps, $3) END, updated_at = now(), status = 'running',"
    " waiting_since = NULL, retry_at = NULL"
)
_UNFINISHED_HELD = "id = $1 AND lease_owner = $2 AND status IN ('pending', 'running', 'waiting')"


async def complete_step(conn: Connection, op_id: str, owner: str, step: str) -> bool:
    done = await conn.fetchval(
        f"UPDATE operations SET {_COMPLETED} WHERE {_UNFINISHED_HELD} RETURNING true",
        op_id,
        owner,
        step,
    )
    return bool(done)


async def complete_and_begin(
    conn: Connection, op_id: str, owner: str, step: str, following: str, progress: int
) -> StepStart:
    """``complete_step``, and ``begin_step`` of the ``following`` step in the same write (a
    round trip and a commit fewer per step): unless the lease went elsewhere, or a
    cancellation was requested, which leaves the following step not begun."""
    row = await conn.fetchrow(
        f"UPDATE operations SET {_COMPLETED},"
        " step = CASE WHEN cancel_requested AND kind = 'provision' THEN step ELSE $4 END,"
        " progress = CASE WHEN cancel_requested AND kind = 'provision' THEN progress"
        " ELSE GREATEST(progress, $5) END"
        f" WHERE {_UNFINISHED_HELD}"
        " RETURNING cancel_requested AND kind = 'provision' AS cancelled",
        op_id,
        owner,
        step,
        following,
        progress,
    )
    if row is None:
        return "lease_lost"
    return "cancel_requested" if row["cancelled"] else "begun"


async def finish_operation(
    conn: Connection,
    op_id: str,
    owner: str,
    status: OperationStatus,
    *,
    resource_status: str | None,
    error: str | None = None,
    result: Mapping[str, Any] | None = None,
    resource_plan: str | None = None,
) -> OperationRecord | None:
    """Moves an unfinished operation to ``status``, and its resource to ``resource_status``
    (None: unchanged) and ``resource_plan`` (a completed resize; None: unchanged).

    A change of a resource that is being removed, or is gone, leaves its status alone."""
    async with conn.transaction():
        row = await conn.fetchrow(
            "UPDATE operations SET status = $3, error = $4, result = $5::text::jsonb,"
            " progress = CASE WHEN $3 = 'completed' THEN 100 ELSE progress END,"
            " finished_at = now(), updated_at = now(), retry_at = NULL"
            " WHERE id = $1 AND lease_owner = $2 AND status IN ('pending', 'running', 'waiting')"
            " RETURNING *",
            op_id,
            owner,
            status,
            error,
            jsonb_text(result),
        )
        if row is None:
            return None
        if resource_status is None and resource_plan is None:
            return OperationRecord.from_row(row)
        await conn.execute(
            "UPDATE resources SET status = coalesce($2, status), plan = coalesce($3, plan),"
            " updated_at = now(),"
            " deleted_at = CASE WHEN $2 = 'deleted' THEN now() ELSE deleted_at END"
            " WHERE id = $1 AND ($4 OR status IN ('active', 'suspended'))",
            row["resource_id"],
            resource_status,
            resource_plan,
            row["kind"] in ("provision", "deprovision"),
        )
    return OperationRecord.from_row(row)


async def mark_outcome(
    conn: Connection, op_id: str, owner: str, *, reported: bool, announced: bool
) -> OperationRecord | None:
    """Records that hooks were told / the terminal event went out; finalized once both are.
    None when ``owner`` no longer holds the lease."""
    row = await conn.fetchrow(
        "UPDATE operations SET"
        " reported_at = CASE WHEN $2 THEN coalesce(reported_at, now()) ELSE reported_at END,"
        " announced_at = CASE WHEN $3 THEN coalesce(announced_at, now()) ELSE announced_at END,"
        " finalized_at = CASE WHEN ($2 OR reported_at IS NOT NULL)"
        " AND ($3 OR announced_at IS NOT NULL) THEN coalesce(finalized_at, now()) END,"
        " updated_at = now() WHERE id = $1 AND finished_at IS NOT NULL AND lease_owner = $4"
        " RETURNING *",
        op_id,
        reported,
        announced,
        owner,
    )
    return _one(row)


async def request_cancel(conn: Connection, op_id: str) -> OperationRecord | None:
    row = await conn.fetchrow(
        "UPDATE operations SET cancel_requested = true, updated_at = now()"
        " WHERE id = $1 AND kind = 'provision' AND status IN ('pending', 'running', 'waiting')"
        " RETURNING *",
        op_id,
    )
    return _one(row)


async def set_waiting(
    conn: Connection, op_id: str, owner: str, retry_in: float
) -> OperationRecord | None:
    """Marks the operation ``waiting`` (its server does not answer) until ``retry_in`` seconds
    from now; ``waiting_since`` keeps the start of the outage. None when the lease is lost."""
    row = await conn.fetchrow(
        "UPDATE operations SET status = 'waiting', waiting_since = coalesce(waiting_since, now()),"
        f" retry_at = {lease_until(3)}, updated_at = now()"
        " WHERE id = $1 AND lease_owner = $2 AND status IN ('pending', 'running', 'waiting')"
        " RETURNING *",
        op_id,
        owner,
        retry_in,
    )
    return _one(row)


async def operation_counts(conn: Connection) -> dict[tuple[str, str], int]:
    """How many operations there are, by (kind, status): for an operator's metrics."""
    rows = await conn.fetch(
        "SELECT kind, status, count(*) AS n FROM operations GROUP BY kind, status"
    )
    return {(r["kind"], r["status"]): r["n"] for r in rows}


async def operation_durations(
    conn: Connection, quantiles: tuple[float, ...] = (0.5, 0.99), *, within_seconds: float = 3600
) -> dict[tuple[str, float], float]:
    """Seconds from creation to finish of the operations finished in the last
    ``within_seconds``, by (kind, quantile). Reads a range of the ``operations_finished``
    index, not every operation ever run."""
    rows = await conn.fetch(
        "SELECT kind, percentile_cont($1::float8[]) WITHIN GROUP (ORDER BY seconds) AS q"
        " FROM (SELECT kind, extract(epoch FROM finished_at - created_at) AS seconds"
        "       FROM operations WHERE finished_at > now() - make_interval(secs => $2))"
        " AS recent GROUP BY kind",
        list(quantiles),
        within_seconds,
    )
    return {(r["kind"], q): float(v) for r in rows for q, v in zip(quantiles, r["q"], strict=True)}
