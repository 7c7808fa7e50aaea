"""The audit log: one function writes every row, whether or not it names a local subscription."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.db import Connection

__all__ = ["AuditEntry", "record_audit", "record_audits"]


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
