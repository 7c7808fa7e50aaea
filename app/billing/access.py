"""Access follows payment (issue 13): what a subscription's status allows its resource's
login, and the operations that make it so.

`past_due` keeps access for a grace period (`LOOKOUT_PAST_DUE_GRACE_DAYS`, counted from when
the subscription turned `past_due`); `unpaid`, `paused` and the end of the grace suspend the
resource (a `suspend` operation: the login is shut out, its sessions ended, a repository's
grants taken back); a subscription that pays again, or resumes, gets it back (a `resume`
operation). Every change of status decides here, under the subscription's row lock, and the
operation is created in that same transaction, so the runner runs a subscription's suspends
and resumes in the order they were decided. `app.billing.access_sweep` is the level-triggered
side: the end of a grace period is no event, and a decision a crash interrupted is taken again.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from app.audit import record_audit
from app.billing.fulfilment import resource_spec
from app.billing.subscriptions import ACTIVE_RESOURCE_STATUSES, SubscriptionRecord, track_past_due
from app.db import Connection
from provisioning import OperationKind, OperationRecord, OperationRunner, resource_for_subject

__all__ = [
    "DEFAULT_GRACE",
    "SUSPENDED_STATUSES",
    "converge_access",
    "suspension_required",
]

logger = logging.getLogger(__name__)

DEFAULT_GRACE = timedelta(days=7)
# Statuses whose resource is suspended at once; `past_due` is, once its grace has passed.
SUSPENDED_STATUSES = frozenset({"unpaid", "paused"})


def suspension_required(
    status: str, past_due_since: datetime | None, *, now: datetime, grace: timedelta
) -> bool:
    """Whether a subscription in `status` must have its resource suspended now."""
    if status in SUSPENDED_STATUSES:
        return True
    return status == "past_due" and past_due_since is not None and past_due_since + grace <= now


async def _suspended(conn: Connection, subject_id: str, resource_status: str) -> bool:
    """Whether the resource is suspended, or will be once the operations decided run: the
    latest suspend or resume decided says, else the resource's own status."""
    latest = await conn.fetchval(
        "SELECT kind FROM operations WHERE subject_id = $1 AND kind IN ('suspend', 'resume')"
        " ORDER BY created_at DESC LIMIT 1",
        subject_id,
    )
    if latest is not None:
        return bool(latest == "suspend")
    return resource_status == "suspended"


async def converge_access(
    conn: Connection,
    runner: OperationRunner,
    record: SubscriptionRecord,
    *,
    grace: timedelta,
    reason: str,
) -> OperationRecord | None:
    """In the caller's transaction, which holds the subscription's row lock: keeps
    `past_due_since` with the status, and creates the `suspend` or `resume` the status now
    requires (None: none). The caller launches it after its commit."""
    past_due_since = await track_past_due(conn, record.id)
    if record.status not in ACTIVE_RESOURCE_STATUSES:
        return None  # not yet provisioned, or ended: provisioning and deprovisioning decide
    resource = await resource_for_subject(conn, record.id)
    if resource is None or resource.status not in ("active", "suspended"):
        return None
    wanted = suspension_required(record.status, past_due_since, now=datetime.now(UTC), grace=grace)
    if wanted == await _suspended(conn, record.id, resource.status):
        return None
    kind: OperationKind = "suspend" if wanted else "resume"
    op = await runner.create_change(
        conn, kind, record.id, record.user_id, resource_spec(record), resource_id=resource.id
    )
    await record_audit(
        conn,
        "subscription.suspended" if wanted else "subscription.resumed",
        user_id=record.user_id,
        subject_id=record.id,
        detail={
            "status": record.status,
            "past_due_since": past_due_since.isoformat() if past_due_since else None,
            "operation_id": op.id,
            "reason": reason,
        },
    )
    return op
