"""One keeper renews every lease of its instance, and tells each operation what it saw."""

from __future__ import annotations

import secrets
from contextlib import AbstractContextManager

import anyio
import asyncpg
import pytest

from provisioning import ProvisionRequest, ResourceSpec
from provisioning.bulk import create_provisions
from provisioning.lease_keeper import LeaseKeeper
from tests.provisioning.support import new_subject

pytestmark = pytest.mark.anyio

GRAPH = ResourceSpec("graph", "graph_standard", {"max_resources": 3})


class Seen:
    def __init__(self) -> None:
        self.cancel_requested: list[str] = []
        self.lost: list[str] = []

    def watch(self, keeper: LeaseKeeper, op_id: str) -> AbstractContextManager[None]:
        return keeper.keeping(
            op_id,
            on_cancel_requested=lambda: self.cancel_requested.append(op_id),
            on_lost=lambda: self.lost.append(op_id),
        )


async def _leased(pool: asyncpg.Pool, user_id: str, owner: str, count: int) -> list[str]:
    requests = [
        (f"op_{secrets.token_hex(12)}", ProvisionRequest(new_subject(), user_id, GRAPH, f"gr_{n}"))
        for n in range(count)
    ]
    async with pool.acquire() as conn:
        created = await create_provisions(conn, requests, lease_owner=owner, lease_seconds=1)
    return [op.id for op in created]


async def _expiries(pool: asyncpg.Pool, op_ids: list[str]) -> dict[str, float]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT id, extract(epoch FROM lease_expires_at - now())::float8 AS left"
            " FROM operations WHERE id = ANY($1::text[])",
            op_ids,
        )
    return {row["id"]: row["left"] for row in rows}


async def test_renewing_extends_held_leases_and_reports_losses_and_cancellations_once(
    db_pool: asyncpg.Pool, user_id: str
) -> None:
    kept, taken, cancelled = await _leased(db_pool, user_id, "me", 3)
    keeper = LeaseKeeper(db_pool, "me", lease_seconds=60)
    seen = Seen()
    async with db_pool.acquire() as conn:
        await conn.execute("UPDATE operations SET lease_owner = 'other' WHERE id = $1", taken)
        await conn.execute("UPDATE operations SET cancel_requested = true WHERE id = $1", cancelled)
    with (
        seen.watch(keeper, kept),
        seen.watch(keeper, taken),
        seen.watch(keeper, cancelled),
    ):
        await keeper.renew()
        await keeper.renew()
    assert seen.lost == [taken]
    assert seen.cancel_requested == [cancelled]
    left = await _expiries(db_pool, [kept, taken, cancelled])
    assert left[kept] > 50 and left[cancelled] > 50
    assert left[taken] < 2  # still the other owner's, untouched


async def test_a_database_that_does_not_answer_loses_leases_only_after_a_whole_lease(
    db_pool: asyncpg.Pool, database_url: str, user_id: str
) -> None:
    fresh, old = await _leased(db_pool, user_id, "me", 2)
    closed = await asyncpg.create_pool(database_url, min_size=0)
    await closed.close()
    keeper = LeaseKeeper(closed, "me", lease_seconds=0.5)
    seen = Seen()
    with seen.watch(keeper, old):
        await anyio.sleep(0.5)
        with seen.watch(keeper, fresh):
            await keeper.renew()
    assert seen.lost == [old]
