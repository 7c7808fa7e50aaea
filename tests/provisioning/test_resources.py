"""What a plan limit counts at provisioning."""

from __future__ import annotations

import asyncpg
import pytest

from app.users import create_user
from provisioning.resources import count_held_before

pytestmark = pytest.mark.anyio


async def test_a_resource_being_removed_does_not_count_against_the_plan(
    db_pool: asyncpg.Pool,
) -> None:
    """Found by the 10-minute chaos soak: a customer who cancelled a graph in the portal and
    bought one again at once paid, then failed here, because the graph being deprovisioned
    still counted (checkout no longer counts its canceled subscription)."""
    async with db_pool.acquire() as conn:
        user = await create_user(conn, "limits@example.com")
        for n, status in enumerate(("active", "deprovisioning", "deleted", "provisioning")):
            await conn.execute(
                "INSERT INTO resources (id, resource_type, user_id, subject_id, plan, status,"
                " created_at) VALUES ($1, 'graph', $2, $3, 'graph-standard', $4,"
                " now() - make_interval(mins => $5))",
                f"gr_{n}",
                user.id,
                f"sub_{n}",
                status,
                10 - n,
            )
        await conn.execute(
            "INSERT INTO resources (id, resource_type, user_id, subject_id, plan)"
            " VALUES ('gr_new', 'graph', $1, 'sub_new', 'graph-standard')",
            user.id,
        )
        # The active one and the one still being provisioned; not those removed or going.
        assert await count_held_before(conn, "gr_new") == 2
