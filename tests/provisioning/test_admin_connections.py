"""One operation's steps share their admin connection to a server (``reusing_connections``),
and operations one after the other share those an ``AdminConnections`` keeps."""

from __future__ import annotations

import secrets

import anyio
import asyncpg
import pytest

from bench.chaos.proxy import fault_proxy, url_through
from provisioning.pgadmin import (
    AdminConnections,
    admin_connection,
    reusing_connections,
    terminate_sessions,
)
from tests.provisioning.support import with_admin
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


async def test_a_keeper_hands_an_operations_connection_to_the_next_one(pg_admin_dsn: str) -> None:
    tag = f"lookout:t{secrets.token_hex(4)}"
    keeper = AdminConnections(max_idle=1)
    try:
        async with reusing_connections(keeper):
            async with admin_connection(pg_admin_dsn, tag=f"{tag}:a") as conn:
                first = conn.get_server_pid()
            # Busy: the inner one is closed at the end, the keeper keeps the other.
            async with (
                admin_connection(pg_admin_dsn, tag=f"{tag}:a"),
                admin_connection(pg_admin_dsn, tag=f"{tag}:inner") as inner,
            ):
                assert inner.get_server_pid() != first
        assert keeper.idle(pg_admin_dsn) == 1
        await settle(pg_admin_dsn, tag, [f"{tag}:a"])
        async with reusing_connections(keeper):
            assert keeper.idle(pg_admin_dsn) == 1  # taken at the first use, not before
            async with admin_connection(pg_admin_dsn, tag=f"{tag}:b") as conn:
                assert conn.get_server_pid() == first
                assert keeper.idle(pg_admin_dsn) == 0
                # Tagged for the step that uses it, as teardown expects.
                named = await conn.fetchval("SELECT current_setting('application_name')")
                assert named == f"{tag}:b"
        assert keeper.idle(pg_admin_dsn) == 1
    finally:
        await keeper.close()
    assert keeper.idle(pg_admin_dsn) == 0
    await settle(pg_admin_dsn, tag, [])


async def fail_in_second_use(keeper: AdminConnections, admin_dsn: str, tag: str) -> None:
    async with reusing_connections(keeper):
        async with admin_connection(admin_dsn, tag=tag) as conn:
            await conn.execute("SELECT 1")
        async with admin_connection(admin_dsn, tag=tag) as conn:
            await conn.execute("SELECT * FROM no_such_table_here")


async def test_a_keeper_gets_nothing_back_from_a_failed_operation(pg_admin_dsn: str) -> None:
    tag = f"lookout:t{secrets.token_hex(4)}"
    keeper = AdminConnections()
    try:
        with pytest.raises(asyncpg.UndefinedTableError):
            await fail_in_second_use(keeper, pg_admin_dsn, tag)
        async with reusing_connections(keeper), admin_connection(pg_admin_dsn, tag=tag) as conn:
            await conn.execute("BEGIN")  # left in a transaction
        assert keeper.idle(pg_admin_dsn) == 0
        await settle(pg_admin_dsn, tag, [])
    finally:
        await keeper.close()


async def test_a_kept_connection_the_server_ended_is_replaced(pg_admin_dsn: str) -> None:
    tag = f"lookout:t{secrets.token_hex(4)}"
    keeper = AdminConnections()
    try:
        async with reusing_connections(keeper), admin_connection(pg_admin_dsn, tag=tag) as conn:
            ended = conn.get_server_pid()
        # Teardown ends the sessions of a graph's tag, an idle kept one among them.
        await with_admin(pg_admin_dsn, lambda c: terminate_sessions(c, tag=tag))
        async with reusing_connections(keeper), admin_connection(pg_admin_dsn, tag=tag) as conn:
            assert conn.get_server_pid() != ended
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await keeper.close()
    await settle(pg_admin_dsn, tag, [])


async def test_a_keeper_closes_what_stayed_idle_too_long(pg_admin_dsn: str) -> None:
    tag = f"lookout:t{secrets.token_hex(4)}"
    keeper = AdminConnections(idle_seconds=0.2)
    try:
        async with reusing_connections(keeper), admin_connection(pg_admin_dsn, tag=tag):
            pass
        assert await keeper.prune() == 0
        await anyio.sleep(0.3)
        assert await keeper.prune() == 1
        assert keeper.idle(pg_admin_dsn) == 0
        await settle(pg_admin_dsn, tag, [])
    finally:
        await keeper.close()


async def test_a_kept_connection_that_stopped_answering_fails_as_a_new_one_would(
    pg_admin_dsn: str,
) -> None:
    """A network gone quiet holds a kept connection: its first use gives up within the connect
    timeout (then a new connection is tried, and times out the same way), never hangs."""
    tag = f"lookout:t{secrets.token_hex(4)}"
    keeper = AdminConnections()
    try:
        async with fault_proxy("quiet", pg_admin_dsn) as proxy:
            dsn = url_through(pg_admin_dsn, proxy.port)
            async with reusing_connections(keeper), admin_connection(dsn, tag=tag):
                pass
            assert keeper.idle(dsn) == 1
            proxy.stall()
            with anyio.fail_after(5), pytest.raises(TimeoutError):
                await use_once(dsn, f"{tag}:next", keeper)
            assert keeper.idle(dsn) == 0
            proxy.unstall()
    finally:
        await keeper.close()


async def use_once(dsn: str, tag: str, keeper: AdminConnections) -> None:
    async with (
        reusing_connections(keeper),
        admin_connection(dsn, tag=tag, connect_timeout=0.5) as conn,
    ):
        await conn.fetchval("SELECT 1")
