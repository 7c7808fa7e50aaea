"""One operation's steps share their admin connection to a server (``reusing_connections``)."""

from __future__ import annotations

import secrets

import anyio
import asyncpg
import pytest

from provisioning.pgadmin import admin_connection, reusing_connections
from tests.support.stack import wait_for

pytestmark = pytest.mark.anyio


async def sessions(admin_dsn: str, prefix: str) -> list[str]:
    conn = await asyncpg.connect(admin_dsn)
    try:
        rows = await conn.fetch(
            "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE $1",
            prefix + "%",
        )
    finally:
        await conn.close()
    return sorted(r["application_name"] for r in rows)


async def settle(admin_dsn: str, prefix: str, expected: list[str]) -> None:
    """Waits until the server lists exactly these sessions (a closed one leaves the list a
    moment after its client let go)."""

    async def check() -> bool | None:
        return await sessions(admin_dsn, prefix) == expected or None

    await wait_for(check, within=10, what=f"sessions {expected}")
    assert await sessions(admin_dsn, prefix) == expected


async def test_steps_share_one_connection_tagged_with_the_latest_step(pg_admin_dsn: str) -> None:
    tag = f"lookout:t{secrets.token_hex(4)}"
    async with reusing_connections():
        async with admin_connection(pg_admin_dsn, tag=f"{tag}:probe") as conn:
            first = conn.get_server_pid()
        async with admin_connection(pg_admin_dsn, tag=tag) as conn:
            assert conn.get_server_pid() == first
            # Teardown finds a step's session by its tag: it follows the step.
            assert await conn.fetchval("SELECT current_setting('application_name')") == tag
            async with admin_connection(pg_admin_dsn, tag=f"{tag}:inner") as inner:
                assert inner.get_server_pid() != first  # in use: another one, closed after
        await settle(pg_admin_dsn, tag, [tag])
    await settle(pg_admin_dsn, tag, [])


async def test_a_connection_left_in_a_transaction_or_by_an_error_is_not_reused(
    pg_admin_dsn: str,
) -> None:
    tag = f"lookout:t{secrets.token_hex(4)}"
    async with reusing_connections():
        async with admin_connection(pg_admin_dsn, tag=tag) as conn:
            left = conn.get_server_pid()
            await conn.execute("BEGIN")
        async with admin_connection(pg_admin_dsn, tag=tag) as conn:
            assert not conn.is_in_transaction()
            failed = conn.get_server_pid()
            assert failed != left
        with pytest.raises(asyncpg.UndefinedTableError):
            async with admin_connection(pg_admin_dsn, tag=tag) as conn:
                await conn.execute("SELECT * FROM no_such_table_here")
        async with admin_connection(pg_admin_dsn, tag=tag) as conn:
            assert conn.get_server_pid() not in {left, failed}
    await settle(pg_admin_dsn, tag, [])


async def test_without_the_scope_each_use_has_its_own_connection(pg_admin_dsn: str) -> None:
    tag = f"lookout:t{secrets.token_hex(4)}"
    async with admin_connection(pg_admin_dsn, tag=tag) as conn:
        first = conn.get_server_pid()
    async with admin_connection(pg_admin_dsn, tag=tag) as conn:
        assert conn.get_server_pid() != first
    await settle(pg_admin_dsn, tag, [])


async def test_a_cancelled_operation_leaves_no_connection_behind(pg_admin_dsn: str) -> None:
    tag = f"lookout:t{secrets.token_hex(4)}"
    with anyio.CancelScope() as scope:
        async with reusing_connections():
            async with admin_connection(pg_admin_dsn, tag=tag) as conn:
                await conn.execute("SELECT 1")
            await settle(pg_admin_dsn, tag, [tag])
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    await settle(pg_admin_dsn, tag, [])
