"""The audit log: one function writes every row, whether or not it names a local subscription."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from app.db import Connection

__all__ = ["record_audit"]


async def record_audit(
    conn: Connection,
    kind: str,
    *,
    user_id: str | None = None,
    subject_id: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> None:
    await conn.execute(
        "INSERT INTO audit_log (kind, user_id, subject_id, detail) VALUES ($1, $2, $3, $4::jsonb)",
        kind,
        user_id,
        subject_id,
        json.dumps(dict(detail or {}), default=str),
    )
