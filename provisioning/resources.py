"""Queries over the resources table: what each provision created, and for whom."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from .operations import Connection

__all__ = [
    "ResourceRecord",
    "claim_orphans",
    "count_held_before",
    "get_resource",
    "mark_deleted",
    "resource_for_subject",
]


@dataclass(frozen=True, slots=True)
class ResourceRecord:
    id: str
    resource_type: str
    user_id: str
    subject_id: str
    plan: str
    status: str  # provisioning, active, deprovisioning, deleted, orphaned
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> ResourceRecord:
        return cls(**dict(row))


async def get_resource(conn: Connection, resource_id: str) -> ResourceRecord | None:
    row = await conn.fetchrow("SELECT * FROM resources WHERE id = $1", resource_id)
    return None if row is None else ResourceRecord.from_row(row)


async def resource_for_subject(conn: Connection, subject_id: str) -> ResourceRecord | None:
    """The latest resource of a subscription that was not deleted."""
    row = await conn.fetchrow(
        "SELECT * FROM resources WHERE subject_id = $1 AND status <> 'deleted'"
        " ORDER BY created_at DESC LIMIT 1",
        subject_id,
    )
    return None if row is None else ResourceRecord.from_row(row)


async def count_held_before(conn: Connection, resource_id: str) -> int:
    """How many live resources of the same plan and user were created before this one (a plan
    limit counts per plan: 3 of one plan do not stop a first of another).

    Counting only earlier ones makes a plan limit decide the same way however concurrent
    provisions interleave: the earliest ones win. One being removed no longer counts, as its
    cancelled subscription no longer counts at checkout: otherwise a customer who cancels and
    buys again at once pays, then fails here (seen in the chaos soak).
    """
    value: int = await conn.fetchval(
        "SELECT count(*) FROM resources other JOIN resources me"
        " ON me.user_id = other.user_id AND me.plan = other.plan"
        " WHERE me.id = $1 AND other.id <> me.id"
        " AND other.status IN ('provisioning', 'active')"
        " AND (other.created_at, other.id) < (me.created_at, me.id)",
        resource_id,
    )
    return value


async def claim_orphans(conn: Connection, *, older_than: float, limit: int) -> list[ResourceRecord]:
    """Orphaned resources untouched for ``older_than`` seconds; touching them claims them."""
    rows = await conn.fetch(
        "UPDATE resources r SET updated_at = now() FROM ("
        " SELECT id FROM resources WHERE status = 'orphaned'"
        " AND updated_at < now() - make_interval(secs => $1::float8)"
        " ORDER BY updated_at LIMIT $2 FOR UPDATE SKIP LOCKED) o"
        " WHERE r.id = o.id RETURNING r.*",
        older_than,
        limit,
    )
    return [ResourceRecord.from_row(r) for r in rows]


async def mark_deleted(conn: Connection, resource_id: str) -> bool:
    done = await conn.fetchval(
        "UPDATE resources SET status = 'deleted', deleted_at = now(), updated_at = now()"
        " WHERE id = $1 AND status = 'orphaned' RETURNING true",
        resource_id,
    )
    return bool(done)
