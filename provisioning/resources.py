"""Queries over the resources table: what each provision created, and for whom."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from .operations import Connection

__all__ = [
    "ResourceRecord",
    "assign_server",
    "claim_orphans",
    "count_held_before",
    "get_resource",
    "graphs_by_server",
    "graphs_on_server",
    "mark_deleted",
    "name_legacy_graphs",
    "pin_server",
    "resource_for_subject",
    "resource_server",
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
    # The provisioning server it lives on (migration 0016; NULL: made before servers were
    # named, on the first one), and whether anything of it may exist there yet (`placed`).
    server: str | None = None
    placed: bool = True

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


# -- which provisioning server a resource lives on (provisioning.placement) -------------------
async def resource_server(conn: Connection, resource_id: str) -> tuple[str | None, bool] | None:
    """``(server, placed)`` of the resource; None when there is no such resource."""
    row = await conn.fetchrow("SELECT server, placed FROM resources WHERE id = $1", resource_id)
    return None if row is None else (row["server"], row["placed"])


async def graphs_by_server(conn: Connection, first: str) -> dict[str, int]:
    """Graphs not deleted, by the server they are on or being placed on (a graph made before
    servers were named counts for ``first``): what placement weighs, and what an operator sees.
    Reads the partial index ``resources_server``."""
    rows = await conn.fetch(
        "SELECT coalesce(server, $1) AS name, count(*) AS n FROM resources"
        " WHERE resource_type = 'graph' AND status <> 'deleted' AND (placed OR server IS NOT NULL)"
        " GROUP BY 1",
        first,
    )
    return {r["name"]: r["n"] for r in rows}


async def graphs_on_server(conn: Connection, name: str, first: str) -> list[ResourceRecord]:
    """The graphs not deleted on the server ``name``, oldest first: a drained server's, for an
    operator to move or wait out."""
    rows = await conn.fetch(
        "SELECT * FROM resources WHERE resource_type = 'graph' AND status <> 'deleted'"
        " AND (placed OR server IS NOT NULL) AND coalesce(server, $2) = $1"
        " ORDER BY created_at, id",
        name,
        first,
    )
    return [ResourceRecord.from_row(r) for r in rows]


async def assign_server(conn: Connection, resource_id: str, name: str) -> bool:
    """Records the server a resource is being placed on, unless it is placed already; the
    count of that server includes it from now on, so concurrent placements spread."""
    done = await conn.fetchval(
        "UPDATE resources SET server = $2 WHERE id = $1 AND NOT placed RETURNING true",
        resource_id,
        name,
    )
    return bool(done)


async def pin_server(conn: Connection, resource_id: str, name: str) -> str | None:
    """Records that the resource lives on ``name`` from now on (before anything is created
    there); answers the server it is placed on, ``name`` unless it was placed already."""
    placed: str | None = await conn.fetchval(
        "UPDATE resources SET server = CASE WHEN placed THEN server ELSE $2 END, placed = true"
        " WHERE id = $1 RETURNING server",
        resource_id,
        name,
    )
    return placed


async def pin_open_server(conn: Connection, resource_id: str, name: str) -> str | None:
    """``pin_server`` in one statement, for a resource with only one server to go to: answers
    the server it is placed on; None when ``name`` is drained (and the resource not placed
    yet), or there is no such resource."""
    placed: str | None = await conn.fetchval(
        "UPDATE resources SET server = CASE WHEN placed THEN server ELSE $2 END, placed = true"
        " WHERE id = $1 AND (placed OR NOT EXISTS (SELECT 1 FROM provisioning_servers"
        " WHERE name = $2 AND drained_at IS NOT NULL)) RETURNING server",
        resource_id,
        name,
    )
    return placed


async def name_legacy_graphs(conn: Connection, first: str) -> int:
    """Gives the graphs made before servers were named (on the only server there was) the
    name of the first one, so that reordering the list later does not move them."""
    done = await conn.execute(
        "UPDATE resources SET server = $1"
        " WHERE server IS NULL AND placed AND resource_type = 'graph'",
        first,
    )
    return int(done.split()[-1])
