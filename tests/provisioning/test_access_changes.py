"""Changes of a live resource (issue 13): a plan change resizes it, a suspension shuts its
login out and ends its sessions, a resumption lets the same login in again; each is an
operation streamed like a provision, and changes of one resource run in the order decided."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
import asyncpg
import pytest
from redis.asyncio import Redis

from provisioning import (
    Credentials,
    GraphBackend,
    OperationKind,
    OperationRecord,
    OperationRunner,
    ResourceSpec,
    SharedRepositoryBackend,
)
from tests.provisioning.support import (
    HoldingBackend,
    Serving,
    new_subject,
    operation_events,
    wait_for,
)

pytestmark = pytest.mark.anyio


def graph_spec(connections: int) -> ResourceSpec:
    return ResourceSpec(
        "graph", f"graph-{connections}", {"max_resources": 3, "max_connections": connections}
    )


def repository_spec(connections: int) -> ResourceSpec:
    return ResourceSpec(
        "repository", f"repo-{connections}", {"max_resources": 3, "max_connections": connections}
    )


@asynccontextmanager
async def sessions(dsn: str, count: int) -> AsyncIterator[Sequence[asyncpg.Connection]]:
    async with AsyncExitStack() as stack:
        opened = []
        for _ in range(count):
            conn = await asyncpg.connect(dsn)
            stack.push_async_callback(conn.close, timeout=2)
            opened.append(conn)
        yield opened


async def can_open(dsn: str, count: int) -> bool:
    """Whether ``count`` sessions can be open at once (the last one refused says no)."""
    try:
        async with sessions(dsn, count):
            return True
    except asyncpg.TooManyConnectionsError:
        return False


async def change(
    db_pool: asyncpg.Pool,
    runner: OperationRunner,
    kind: OperationKind,
    provision: OperationRecord,
    spec: ResourceSpec,
) -> OperationRecord:
    """Creates the change in a transaction, launches it after the commit, waits for its end."""
    async with db_pool.acquire() as conn, conn.transaction():
        op = await runner.create_change(
            conn,
            kind,
            provision.subject_id,
            provision.user_id,
            spec,
            resource_id=provision.resource_id,
        )
    await runner.launch([op])
    done = await wait_for(db_pool, op.id)
    assert done.status == "completed", done.error
    return done


async def suspend_resume_suspend(
    db_pool: asyncpg.Pool, runner: OperationRunner, provision: OperationRecord
) -> list[OperationRecord]:
    """Three changes of the provision's resource, each created in a transaction of its own (in
    this order) and not launched."""
    created = []
    async with db_pool.acquire() as conn:
        kinds: tuple[OperationKind, ...] = ("suspend", "resume", "suspend")
        for kind in kinds:
            async with conn.transaction():
                created.append(
                    await runner.create_change(
                        conn,
                        kind,
                        provision.subject_id,
                        provision.user_id,
                        graph_spec(3),
                        resource_id=provision.resource_id,
                    )
                )
    return created


async def resource_row(db_pool: asyncpg.Pool, resource_id: str) -> tuple[str, str]:
    row = await db_pool.fetchrow("SELECT status, plan FROM resources WHERE id = $1", resource_id)
    assert row is not None
    return row["status"], row["plan"]


async def test_a_graph_is_resized_up_and_down_for_real(
    db_pool: asyncpg.Pool,
    serving: Serving,
    graph_backend: GraphBackend,
    user_id: str,
    redis: Redis,
    redis_prefix: str,
) -> None:
    async with serving([graph_backend]) as runner:
        provision = await runner.start("provision", new_subject(), user_id, graph_spec(2))
        assert (await wait_for(db_pool, provision.id)).status == "completed"
        login: Credentials = await runner.rotate_credentials(provision.resource_id)
        assert not await can_open(login.dsn, 3)

        bigger = await change(db_pool, runner, "resize", provision, graph_spec(4))
        assert await can_open(login.dsn, 4)
        assert not await can_open(login.dsn, 5)
        assert await resource_row(db_pool, provision.resource_id) == ("active", "graph-4")
        events = await operation_events(redis, redis_prefix, bigger.id)
        assert events[0]["type"] == "operation.started"
        assert events[-1]["type"] == "operation.completed"
        assert {e["kind"] for e in events} == {"resize"}
        assert [e["step"] for e in events if e["type"] == "operation.progress"] == [
            "apply_limits",
            "verify_limits",
        ]

        smaller = await change(db_pool, runner, "resize", provision, graph_spec(1))
        assert smaller.generation == bigger.generation + 1
        assert await can_open(login.dsn, 1)
        assert not await can_open(login.dsn, 2)
        assert await runner.open_connections(provision.resource_id, "graph") == 0
        async with sessions(login.dsn, 1):
            assert await runner.open_connections(provision.resource_id, "graph") == 1


async def test_a_suspended_graph_refuses_its_login_and_ends_its_sessions_until_resumed(
    db_pool: asyncpg.Pool,
    serving: Serving,
    graph_backend: GraphBackend,
    user_id: str,
    redis: Redis,
    redis_prefix: str,
) -> None:
    async with serving([graph_backend]) as runner:
        provision = await runner.start("provision", new_subject(), user_id, graph_spec(3))
        assert (await wait_for(db_pool, provision.id)).status == "completed"
        login = await runner.rotate_credentials(provision.resource_id)
        open_session = await asyncpg.connect(login.dsn)
        try:
            await open_session.execute("INSERT INTO nodes (labels) VALUES ('{Kept}')")
            suspend = await change(db_pool, runner, "suspend", provision, graph_spec(3))
            with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError)):
                await open_session.fetchval("SELECT 1")
        finally:
            with contextlib.suppress(Exception):
                await open_session.close(timeout=2)
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
            await asyncpg.connect(login.dsn)
        assert (await resource_row(db_pool, provision.resource_id))[0] == "suspended"
        types = [e["type"] for e in await operation_events(redis, redis_prefix, suspend.id)]
        assert types[0] == "operation.started" and types[-1] == "operation.completed"

        await change(db_pool, runner, "resume", provision, graph_spec(3))
        # The same password as before: a suspension is not a new login.
        conn = await asyncpg.connect(login.dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM nodes") == 1
        finally:
            await conn.close()
        assert (await resource_row(db_pool, provision.resource_id))[0] == "active"


async def test_changes_of_one_resource_run_in_the_order_they_were_created(
    db_pool: asyncpg.Pool,
    serving: Serving,
    graph_backend: GraphBackend,
    user_id: str,
) -> None:
    async with serving([graph_backend]) as runner:
        provision = await runner.start("provision", new_subject(), user_id, graph_spec(3))
        assert (await wait_for(db_pool, provision.id)).status == "completed"
        login = await runner.rotate_credentials(provision.resource_id)
        created = await suspend_resume_suspend(db_pool, runner, provision)
        # Launched last first: they still run first to last, and the last one stands.
        await runner.launch(list(reversed(created)))
        finished = [await wait_for(db_pool, op.id) for op in created]
        assert [op.status for op in finished] == ["completed"] * 3
        ends = [op.finished_at for op in finished if op.finished_at is not None]
        assert len(ends) == 3 and ends == sorted(ends)
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
            await asyncpg.connect(login.dsn)


async def test_a_repository_login_is_resized_suspended_and_resumed(
    db_pool: asyncpg.Pool,
    serving: Serving,
    pg_admin_dsn: str,
    user_id: str,
    name_prefix: str,
) -> None:
    backend = SharedRepositoryBackend(
        pg_admin_dsn, database=f"{name_prefix}shared", name_prefix=name_prefix
    )
    async with serving([backend]) as runner:
        provision = await runner.start("provision", new_subject(), user_id, repository_spec(1))
        assert (await wait_for(db_pool, provision.id)).status == "completed"
        login = await runner.rotate_credentials(provision.resource_id)
        assert not await can_open(login.dsn, 2)
        await change(db_pool, runner, "resize", provision, repository_spec(2))
        assert await can_open(login.dsn, 2)

        await change(db_pool, runner, "suspend", provision, repository_spec(2))
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
            await asyncpg.connect(login.dsn)
        grants = await db_pool.fetchval(
            "SELECT has_database_privilege($1, $2, 'CONNECT')", login.user, login.database
        )
        assert grants is False

        await change(db_pool, runner, "resume", provision, repository_spec(2))
        conn = await asyncpg.connect(login.dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM repository.countries") == 5
        finally:
            await conn.close()


async def test_changes_a_full_instance_hands_over_run_in_order_on_one_with_room(
    db_pool: asyncpg.Pool,
    serving: Serving,
    graph_backend: GraphBackend,
    user_id: str,
    redis: Redis,
    redis_prefix: str,
) -> None:
    holding = HoldingBackend(graph_backend, hold_at="create_database")
    async with (
        serving([holding], max_concurrent=1) as full,
        serving([graph_backend], max_concurrent=1) as roomy,
    ):
        provision = await roomy.start("provision", new_subject(), user_id, graph_spec(3))
        assert (await wait_for(db_pool, provision.id)).status == "completed"
        login = await roomy.rotate_credentials(provision.resource_id)
        # The full instance's one slot is taken by a provision held mid-way.
        blocker = await full.start("provision", new_subject(), user_id, graph_spec(3))
        with anyio.fail_after(30):
            await holding.holding.wait()
        created = await suspend_resume_suspend(db_pool, full, provision)
        # Launched where there is no room, last first: handed over, they still run on the
        # other instance first to last, each once, and the last one stands.
        await full.launch(list(reversed(created)))
        finished = [await wait_for(db_pool, op.id) for op in created]
        assert [op.status for op in finished] == ["completed"] * 3
        assert {op.lease_owner for op in finished} == {roomy.instance_id}
        # Each claimed twice: by the full instance, which handed it over, then by the other.
        assert [op.attempts for op in finished] == [2, 2, 2]
        ends = [op.finished_at for op in finished if op.finished_at is not None]
        assert len(ends) == 3 and ends == sorted(ends)
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
            await asyncpg.connect(login.dsn)
        assert full.active == {blocker.id}
        holding.release.set()
        assert (await wait_for(db_pool, blocker.id)).status == "completed"
    for op in created:
        events = await operation_events(redis, redis_prefix, op.id)
        assert [e["type"] for e in events].count("operation.started") == 1
        assert events[-1]["type"] == "operation.completed"
