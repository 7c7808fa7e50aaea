"""Leases on operations: release, and claiming expired ones (`LeaseKeeper` renews them)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anyio
import asyncpg

from .operations import Connection, OperationRecord, lease_until

__all__ = [
    "claim_expired",
    "claim_operation",
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


_CLAIM = f"""
WITH claimable AS (
    SELECT id FROM operations
    WHERE finalized_at IS NULL
      AND (lease_expires_at IS NULL OR lease_expires_at < now())
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
    """Takes up to ``limit`` unfinished operations whose lease expired (oldest first)."""
    rows = await conn.fetch(_CLAIM, owner, lease_seconds, None, limit)
    return [OperationRecord.from_row(r) for r in rows]


async def claim_operation(
    conn: Connection, op_id: str, owner: str, lease_seconds: float
) -> OperationRecord | None:
    """Takes this one operation if its lease expired."""
    row = await conn.fetchrow(_CLAIM, owner, lease_seconds, op_id, 1)
    return None if row is None else OperationRecord.from_row(row)


async def release_quietly(pool: asyncpg.Pool, op_id: str, owner: str, retry_after: float) -> None:
    """``release_lease`` within 2 s, even while being cancelled; failures are only logged."""
    with anyio.move_on_after(2, shield=True):
        try:
            async with pool.acquire() as conn:
                await release_lease(conn, op_id, owner, retry_after=retry_after)
        except Exception as exc:
            logger.warning("operation %s: lease not released (%s)", op_id, type(exc).__name__)
