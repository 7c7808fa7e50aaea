"""Creating many provisions in one statement, inside the caller's transaction.

When a burst of payments is confirmed at once, one INSERT for all of them (instead of one
round trip each) is what lets `operation.started` follow each payment within milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .backend import ResourceSpec
from .operations import Connection, OperationRecord, jsonb_text, lease_until

__all__ = ["ProvisionRequest", "create_provisions"]


@dataclass(frozen=True, slots=True)
class ProvisionRequest:
    """One subject to provision; ``resource_id`` is the id its owner already knows."""

    subject_id: str
    user_id: str
    spec: ResourceSpec
    resource_id: str


_CREATE_MANY = f"""
WITH wanted AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                         $6::text[], $7::text[])
        AS w(id, subject_id, user_id, resource_type, resource_id, spec, plan)
), op AS (
    INSERT INTO operations (id, kind, subject_id, user_id, resource_type, resource_id, spec,
                            lease_owner, lease_expires_at, attempts)
    SELECT id, 'provision', subject_id, user_id, resource_type, resource_id, spec::jsonb,
           $8, {lease_until(9)}, 1
      FROM wanted
    ON CONFLICT (kind, subject_id, generation) DO NOTHING
    RETURNING *
), created AS (
    INSERT INTO resources (id, resource_type, user_id, subject_id, plan)
    SELECT op.resource_id, op.resource_type, op.user_id, op.subject_id, wanted.plan
      FROM op JOIN wanted USING (id)
)
SELECT * FROM op
"""


async def create_provisions(
    conn: Connection,
    requests: Sequence[tuple[str, ProvisionRequest]],
    *,
    lease_owner: str,
    lease_seconds: float,
) -> list[OperationRecord]:
    """Inserts a provision, leased to ``lease_owner``, for each ``(operation id, request)``
    whose subject has none yet, with its resource row; answers the operations created. With
    no requests the statement runs all the same (it warms a connection up)."""
    columns: list[list[str | None]] = [[] for _ in range(7)]
    for op_id, request in requests:
        spec = request.spec
        values = (
            op_id,
            request.subject_id,
            request.user_id,
            spec.resource_type,
            request.resource_id,
            jsonb_text(spec.to_json()),
            spec.plan_name,
        )
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    rows = await conn.fetch(_CREATE_MANY, *columns, lease_owner, lease_seconds)
    return [OperationRecord.from_row(row) for row in rows]
