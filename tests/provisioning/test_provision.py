"""A provision creates a private graph database, streams every step, and happens once."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace

import anyio
import asyncpg
import pytest
from redis.asyncio import Redis

from provisioning import GraphBackend, ProvisionerBackend, ResourceSpec, Step, get_operation
from provisioning.backend import OperationKind, StepContext
from provisioning.resources import get_resource
from tests.provisioning.support import (
    HoldingBackend,
    RecordingHooks,
    Serving,
    WrappedBackend,
    new_subject,
    operation_events,
    server_objects,
    user_events,
    wait_for,
    with_admin,
)

pytestmark = pytest.mark.anyio

GRAPH = ResourceSpec("graph", "graph_standard", {"max_resources": 3, "max_connections": 5})
PROVISION_STEPS = [
    "check_limits",
    "create_database",
    "create_role",
    "grant_access",
    "apply_schema",
    "verify",
]


async def test_provision_creates_a_database_only_its_role_can_open(
    db_pool: asyncpg.Pool,
    redis: Redis,
    redis_prefix: str,
    hooks: RecordingHooks,
    serving: Serving,
    graph_backend: GraphBackend,
    pg_admin_dsn: str,
    user_id: str,
    name_prefix: str,
) -> None:
    subject = new_subject()
    async with serving([graph_backend]) as runner:
        op = await runner.start("provision", subject, user_id, GRAPH)
        done = await wait_for(db_pool, op.id)
        credentials = await runner.rotate_credentials(op.resource_id)

    assert done.status == "completed"
    assert done.progress == 100
    assert done.error is None
    assert list(done.completed_steps) == PROVISION_STEPS
    assert done.result == {
        "resource_type": "graph",
        "resource_id": op.resource_id,
        "plan": "graph_standard",
    }
    async with db_pool.acquire() as conn:
        resource = await get_resource(conn, op.resource_id)
    assert resource is not None and resource.status == "active"
    assert [o.id for o in hooks.succeeded] == [op.id]
    assert hooks.failed == []
    assert hooks.audit_kinds(op.id) == ["operation.started", "operation.completed"]

    db = graph_backend.database_name(op.resource_id)
    dbs, roles = await server_objects(pg_admin_dsn, name_prefix)
    assert (dbs, sorted(roles)) == ([db], [db, graph_backend.owner_name(op.resource_id)])
    assert credentials.database == db and credentials.user == db

    # Its own role opens it, owns the graph tables and may write to them.
    own = await asyncpg.connect(credentials.dsn)
    try:
        await own.execute(
            "INSERT INTO nodes (labels, properties) VALUES ('{Person}', '{\"name\": \"Ada\"}')"
        )
        owners = await own.fetch(
            "SELECT c.relname, pg_get_userbyid(c.relowner) AS owner FROM pg_class c"
            " WHERE c.relname IN ('nodes', 'edges', 'nodes_properties_idx')"
        )
        assert {r["relname"]: r["owner"] for r in owners} == {
            "nodes": db,
            "edges": db,
            "nodes_properties_idx": db,
        }
        gin = await own.fetchval(
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'nodes_properties_idx'"
            " AND indexdef LIKE '%USING gin%'"
        )
        assert gin == 1
    finally:
        await own.close()

    # Another, freshly created login role is refused, even with a password and trust auth.
    stranger = f"{name_prefix}stranger"
    await with_admin(
        pg_admin_dsn, lambda c: c.execute(f"CREATE ROLE \"{stranger}\" LOGIN PASSWORD 'pw-x1'")
    )
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await asyncpg.connect(pg_admin_dsn, user=stranger, password="pw-x1", database=db)

    # Every step, in order, on the operation's stream and the user's, and nothing secret.
    events = await operation_events(redis, redis_prefix, op.id)
    assert [e["type"] for e in events] == [
        "operation.started",
        *["operation.progress"] * len(PROVISION_STEPS),
        "operation.completed",
    ]
    assert [e["step"] for e in events[1:-1]] == PROVISION_STEPS
    progress = [e["progress"] for e in events]
    assert progress == sorted(progress) and progress[-1] == 100
    assert all(e["operation_id"] == op.id and e["ts"].endswith("Z") for e in events)
    assert all(isinstance(e["message"], str) and e["message"] for e in events)
    assert events[-1]["status"] == "completed" and events[-1]["result"] == done.result
    assert await user_events(redis, redis_prefix, user_id) == events
    raw = json.dumps(events)
    assert credentials.password not in raw and "postgresql://" not in raw
    assert "password" not in raw.lower()


async def test_rotating_credentials_changes_the_stored_verifier(
    db_pool: asyncpg.Pool,
    serving: Serving,
    graph_backend: GraphBackend,
    pg_admin_dsn: str,
    user_id: str,
) -> None:
    async with serving([graph_backend]) as runner:
        op = await runner.start("provision", new_subject(), user_id, GRAPH)
        await wait_for(db_pool, op.id)
        first = await runner.rotate_credentials(op.resource_id)
        stored_first = await with_admin(
            pg_admin_dsn,
            lambda c: c.fetchval(
                "SELECT rolpassword FROM pg_authid WHERE rolname = $1", first.user
            ),
        )
        second = await runner.rotate_credentials(op.resource_id)
        stored_second = await with_admin(
            pg_admin_dsn,
            lambda c: c.fetchval(
                "SELECT rolpassword FROM pg_authid WHERE rolname = $1", second.user
            ),
        )
    assert first.password != second.password
    assert stored_first.startswith("SCRAM-SHA-256$") and stored_first != stored_second
    assert first.password not in repr(first) and first.password in first.dsn
    conn = await asyncpg.connect(second.dsn)
    try:
        assert await conn.fetchval("SELECT current_user") == second.user
    finally:
        await conn.close()


async def test_the_same_subject_started_five_times_at_once_gives_one_database(
    db_pool: asyncpg.Pool,
    redis: Redis,
    redis_prefix: str,
    hooks: RecordingHooks,
    serving: Serving,
    graph_backend: GraphBackend,
    pg_admin_dsn: str,
    user_id: str,
    name_prefix: str,
) -> None:
    subject = new_subject()
    ids: list[str] = []
    async with serving([graph_backend]) as runner:

        async def start() -> None:
            ids.append((await runner.start("provision", subject, user_id, GRAPH)).id)

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(start)
        assert len(set(ids)) == 1
        done = await wait_for(db_pool, ids[0])

    assert done.status == "completed"
    assert await db_pool.fetchval("SELECT count(*) FROM operations") == 1
    assert await db_pool.fetchval("SELECT count(*) FROM resources") == 1
    dbs, roles = await server_objects(pg_admin_dsn, name_prefix)
    assert dbs == [graph_backend.database_name(done.resource_id)]
    assert len(roles) == 2  # the login role and the owner of its database
    types = [e["type"] for e in await operation_events(redis, redis_prefix, done.id)]
    assert types.count("operation.started") == 1 and types.count("operation.completed") == 1
    assert len(hooks.succeeded) == 1


async def test_deprovision_revokes_access_and_drops_the_database(
    db_pool: asyncpg.Pool,
    redis: Redis,
    redis_prefix: str,
    hooks: RecordingHooks,
    serving: Serving,
    graph_backend: GraphBackend,
    pg_admin_dsn: str,
    user_id: str,
    name_prefix: str,
) -> None:
    subject = new_subject()
    async with serving([graph_backend]) as runner:
        provision = await runner.start("provision", subject, user_id, GRAPH)
        await wait_for(db_pool, provision.id)
        credentials = await runner.rotate_credentials(provision.resource_id)
        session = await asyncpg.connect(credentials.dsn)  # a customer still connected
        try:
            op = await runner.start("deprovision", subject, user_id, GRAPH)
            again = await runner.start("deprovision", subject, user_id, GRAPH)
            done = await wait_for(db_pool, op.id)
        finally:
            await session.close()

    assert again.id == op.id and op.resource_id == provision.resource_id
    assert done.status == "completed" and done.progress == 100
    assert await server_objects(pg_admin_dsn, name_prefix) == ([], [])
    async with db_pool.acquire() as conn:
        resource = await get_resource(conn, provision.resource_id)
    assert resource is not None and resource.status == "deleted" and resource.deleted_at
    events = await operation_events(redis, redis_prefix, op.id)
    assert [e["type"] for e in events] == [
        "operation.started",
        *["operation.progress"] * 3,
        "operation.completed",
    ]
    assert [e["step"] for e in events[1:4]] == ["revoke_access", "drop_database", "drop_role"]
    # Deprovisioning reports to the audit log only: the subscription hooks are for provisions.
    assert len(hooks.succeeded) == 1 and hooks.failed == []
    assert hooks.audit_kinds(op.id) == ["operation.started", "operation.completed"]


async def test_plan_limit_fails_the_provision_that_goes_over_it(
    db_pool: asyncpg.Pool,
    hooks: RecordingHooks,
    serving: Serving,
    graph_backend: GraphBackend,
    pg_admin_dsn: str,
    user_id: str,
    name_prefix: str,
) -> None:
    one_graph = ResourceSpec("graph", "graph_starter", {"max_resources": 1})
    async with serving([graph_backend]) as runner:
        first = await runner.start("provision", new_subject(), user_id, one_graph)
        assert (await wait_for(db_pool, first.id)).status == "completed"
        second = await runner.start("provision", new_subject(), user_id, one_graph)
        failed = await wait_for(db_pool, second.id)

    assert failed.status == "failed" and failed.step == "check_limits"
    assert failed.error is not None and "graph_starter plan allows 1" in failed.error
    assert [(o.id, message) for o, message in hooks.failed] == [(second.id, failed.error)]
    dbs, _ = await server_objects(pg_admin_dsn, name_prefix)
    assert dbs == [graph_backend.database_name(first.resource_id)]


async def test_operations_beyond_the_concurrency_limit_are_announced_and_wait(
    db_pool: asyncpg.Pool,
    serving: Serving,
    redis: Redis,
    redis_prefix: str,
    graph_backend: GraphBackend,
    user_id: str,
) -> None:
    holding = HoldingBackend(graph_backend, hold_at="create_database")
    async with serving([holding], max_concurrent=1) as runner:
        first = await runner.start("provision", new_subject(), user_id, GRAPH)
        with anyio.fail_after(30):
            await holding.holding.wait()
        second = await runner.start("provision", new_subject(), user_id, GRAPH)
        with anyio.fail_after(30):
            # Announced at once, though it cannot run yet.
            while True:
                if await operation_events(redis, redis_prefix, second.id):
                    break
                await anyio.sleep(0.02)
        async with db_pool.acquire() as conn:
            waiting = await get_operation(conn, second.id)
        assert waiting is not None and waiting.status == "pending" and waiting.step is None
        assert runner.active == {first.id, second.id}
        holding.release.set()
        for op in (first, second):
            assert (await wait_for(db_pool, op.id)).status == "completed"
    events = await operation_events(redis, redis_prefix, second.id)
    assert events[0]["type"] == "operation.started" and events[0]["progress"] == 0


class StepLog(WrappedBackend):
    """Passes steps through, noting ``(instance, operation id, step)`` of each one run."""

    def __init__(self, inner: ProvisionerBackend, instance: str, log: list[tuple[str, str, str]]):
        super().__init__(inner)
        self.instance = instance
        self.log = log

    def steps(self, kind: OperationKind) -> Sequence[Step]:
        return [self._noted(s) for s in self.inner.steps(kind)]

    def _noted(self, step: Step) -> Step:
        async def run(ctx: StepContext) -> None:
            self.log.append((self.instance, ctx.operation_id, step.name))
            await step.run(ctx)

        return replace(step, run=run)


async def test_an_operation_without_a_slot_is_provisioned_by_an_instance_with_room(
    db_pool: asyncpg.Pool,
    serving: Serving,
    hooks: RecordingHooks,
    redis: Redis,
    redis_prefix: str,
    graph_backend: GraphBackend,
    user_id: str,
) -> None:
    log: list[tuple[str, str, str]] = []
    holding = HoldingBackend(StepLog(graph_backend, "a", log), hold_at="create_database")
    async with (
        serving([holding], max_concurrent=1) as a,
        serving([StepLog(graph_backend, "b", log)], max_concurrent=1) as b,
    ):
        first = await a.start("provision", new_subject(), user_id, GRAPH)
        with anyio.fail_after(30):
            await holding.holding.wait()
        second = await a.start("provision", new_subject(), user_id, GRAPH)
        done = await wait_for(db_pool, second.id)
        assert done.status == "completed" and done.lease_owner == b.instance_id
        assert first.id in a.active and second.id not in a.active
        holding.release.set()
        assert (await wait_for(db_pool, first.id)).status == "completed"
    # Each step once, all on b (check_limits is the runner's, not the backend's).
    assert list(done.completed_steps) == PROVISION_STEPS
    assert [(i, s) for i, o, s in log if o == second.id] == [("b", s) for s in PROVISION_STEPS[1:]]
    events = await operation_events(redis, redis_prefix, second.id)
    assert [e["type"] for e in events].count("operation.started") == 1
    assert events[0]["type"] == "operation.started"
    assert hooks.audit_kinds(second.id).count("operation.started") == 1


async def test_a_full_instance_leaves_what_it_handed_over_and_can_still_cancel_it(
    db_pool: asyncpg.Pool,
    serving: Serving,
    redis: Redis,
    redis_prefix: str,
    graph_backend: GraphBackend,
    user_id: str,
) -> None:
    holding = HoldingBackend(graph_backend, hold_at="create_database")
    async with serving([holding], max_concurrent=1, sweep_interval=0.1) as runner:
        first = await runner.start("provision", new_subject(), user_id, GRAPH)
        with anyio.fail_after(30):
            await holding.holding.wait()
        second = await runner.start("provision", new_subject(), user_id, GRAPH)
        unowned = await wait_for(db_pool, second.id, lambda op: op.lease_owner is None)
        # Many sweeps later, still unowned: an instance at capacity claims nothing.
        await anyio.sleep(1)
        async with db_pool.acquire() as conn:
            left = await get_operation(conn, second.id)
        assert left is not None and left.lease_owner is None
        assert left.attempts == unowned.attempts and runner.active == {first.id}
        cancelled = await runner.cancel(second.id)
        assert cancelled.status == "cancelled" and cancelled.step is None
        holding.release.set()
        assert (await wait_for(db_pool, first.id)).status == "completed"
    events = await operation_events(redis, redis_prefix, second.id)
    assert [e["type"] for e in events] == ["operation.started", "operation.cancelled"]
