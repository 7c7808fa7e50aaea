"""A shared-repository plan grants the customer's own role read access, and takes it back."""

from __future__ import annotations

import asyncpg
import pytest
from redis.asyncio import Redis

from provisioning import ResourceSpec, SharedRepositoryBackend
from tests.provisioning.support import (
    Serving,
    new_subject,
    operation_events,
    server_objects,
    wait_for,
)

pytestmark = pytest.mark.anyio

REPOSITORY = ResourceSpec("repository", "repository_reader")


async def test_repository_access_is_read_only_and_revoked_on_deprovision(
    db_pool: asyncpg.Pool,
    serving: Serving,
    redis: Redis,
    redis_prefix: str,
    pg_admin_dsn: str,
    user_id: str,
    name_prefix: str,
) -> None:
    backend = SharedRepositoryBackend(
        pg_admin_dsn, database=f"{name_prefix}shared", name_prefix=name_prefix
    )
    first, second = new_subject(), new_subject()
    async with serving([backend]) as runner:
        ops = [await runner.start("provision", s, user_id, REPOSITORY) for s in (first, second)]
        for op in ops:
            assert (await wait_for(db_pool, op.id)).status == "completed"
        credentials = await runner.rotate_credentials(ops[0].resource_id)

        reader = await asyncpg.connect(credentials.dsn)
        try:
            assert await reader.fetchval("SELECT count(*) FROM repository.cities") == 8
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await reader.execute("DELETE FROM repository.cities")
            # Read-only by default, and without the privilege once the default is lifted.
            await reader.execute("SET default_transaction_read_only = off")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await reader.execute("DELETE FROM repository.cities")
        finally:
            await reader.close()

        deprovision = await runner.start("deprovision", first, user_id, REPOSITORY)
        assert (await wait_for(db_pool, deprovision.id)).status == "completed"

    dbs, roles = await server_objects(pg_admin_dsn, name_prefix)
    # The repository stays for the other subscriber; only the first role is gone.
    assert dbs == [f"{name_prefix}shared"]
    assert roles == [backend.role_name(ops[1].resource_id)]
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await asyncpg.connect(credentials.dsn)
    steps = [e.get("step") for e in await operation_events(redis, redis_prefix, ops[0].id)]
    assert steps[1:-1] == [
        "check_limits",
        "ensure_repository",
        "create_role",
        "grant_read",
        "verify",
    ]
