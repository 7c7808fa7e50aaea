"""The audit log: one function writes every row, whether or not it names a local subscription."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.db import Connection

__all__ = ["AuditEntry", "record_audit", "record_audits", "record_event_audit"]


@dataclass(frozen=True, slots=True)
class AuditEntry:
    kind: str
    user_id: str | None = None
    subject_id: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


async def record_audit(
    conn: Connection,
    kind: str,
    *,
    user_id: str | None = None,
    subject_id: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> None:
    await record_audits(conn, [AuditEntry(kind, user_id, subject_id, detail or {})])


async def record_audits(conn: Connection, entries: Sequence[AuditEntry]) -> None:
    """Many rows in one statement, in order (none: the statement runs all the same, which is
    what warms a connection up for it)."""
    await conn.execute(
        "INSERT INTO audit_log (kind, user_id, subject_id, detail)"
        " SELECT kind, user_id, subject_id, detail::jsonb"
        " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY"
        " AS e(kind, user_id, subject_id, detail, n) ORDER BY n",
        [e.kind for e in entries],
        [e.user_id for e in entries],
        [e.subject_id for e in entries],
        [json.dumps(dict(e.detail), default=str) for e in entries],
    )


async def record_event_audit(
    conn: Connection,
    kind: str,
    *,
    event_id: str,
    user_id: str | None,
    subject_id: str | None,
    detail: Mapping[str, Any],
    wait_for_flush: bool = True,
) -> bool:
    """One row for an event handled, however often its handling is tried again (a retry after
    its outcome could not be recorded, two instances at once after a claim lapsed): answers
    whether this call wrote it. A transaction-scoped lock on the event id makes the check and
    the insert one step for every writer.

    ``wait_for_flush=False``: the commit does not wait for its WAL to reach the disk
    (synchronous_commit off, for this transaction only). For a caller that records something
    durably after it, which flushes this row too: a PostgreSQL crash can then lose this row only
    together with that later record, and the step is done again."""
    async with conn.transaction():
        # In the lock's round trip: set_config(..., true) lasts to the end of the transaction,
        # and its commit reads it.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('audit:' || $1)),"
            " set_config('synchronous_commit', CASE WHEN $2 THEN 'on' ELSE 'off' END, true)",
            event_id,
            wait_for_flush,
        )
        written = await conn.fetchval(
            "INSERT INTO audit_log (kind, user_id, subject_id, detail)"
            " SELECT $1, $2, $3, $4::jsonb"
            " WHERE NOT EXISTS (SELECT 1 FROM audit_log"
            "                   WHERE detail ? 'event_id' AND detail->>'event_id' = $5"
            "                   AND kind = $1)"
            " RETURNING true",
            kind,
            user_id,
            subject_id,
            json.dumps({"event_id": event_id, **detail}, default=str),
            event_id,
        )
    return bool(written)
