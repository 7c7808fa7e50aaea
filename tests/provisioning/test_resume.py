"""Work left by a dead instance is resumed by another, from its last completed step."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import anyio
import asyncpg
import pytest
from redis.asyncio import Redis

from provisioning import GraphBackend, OperationRecord, ResourceSpec
from provisioning.backend import StepContext
from provisioning.limits import check_limits_step
from provisioning.operations import (
    Connection,
    begin_step,
    complete_and_begin,
    complete_step,
    create_operation,
    get_operation,
    mark_started,
    request_cancel,
)
from tests.provisioning.support import (
    HoldingBackend,
    RecordingHooks,
    Serving,
    new_subject,
    operation_events,
    server_objects,
    wait_for,
)

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
GRAPH = ResourceSpec("graph", "graph_standard")


async def leased_provision(
    conn: Connection,
    user_id: str,
    owner: str,
    lease_seconds: float,
    *,
    op_id: str | None = None,
) -> OperationRecord:
    """A new provision of a graph, leased to ``owner`` (expired already if negative)."""
    op, created = await create_operation(
        conn,
        op_id=op_id or "op_" + os.urandom(12).hex(),
        kind="provision",
        subject_id=new_subject(),
        user_id=user_id,
        resource_id="gr_" + os.urandom(12).hex(),
        spec=GRAPH,
        lease_owner=owner,
        lease_seconds=lease_seconds,
    )
    assert created
    return op


async def test_an_expired_lease_is_claimed_and_resumed_from_the_last_completed_step(
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
    # An instance "dead" took the operation, ran three steps and recorded two of them (it died
    # after create_role had run), and its lease has expired.
    async with db_pool.acquire() as conn:
        op = await leased_provision(conn, user_id, "dead", -1, op_id="op_" + "ab" * 12)
        assert await mark_started(conn, op.id, "dead")
    ctx = StepContext(op.id, "provision", op.subject_id, user_id, op.resource_id, GRAPH)
    steps = [check_limits_step(db_pool), *graph_backend.steps("provision")]
    for step in steps[:3]:
        await step.run(ctx)
    async with db_pool.acquire() as conn:
        for step in steps[:2]:
            assert await complete_step(conn, op.id, "dead", step.name)

    async with serving([graph_backend], lease_seconds=5) as runner:
        done = await wait_for(db_pool, op.id)
        assert runner.instance_id == done.lease_owner

    assert done.status == "completed" and done.attempts == 2
    assert [s.name for s in steps] == list(done.completed_steps)
    dbs, roles = await server_objects(pg_admin_dsn, name_prefix)
    assert dbs == [graph_backend.database_name(op.resource_id)]
    assert len(roles) == 2  # the login role and the owner of its database
    events = await operation_events(redis, redis_prefix, op.id)
    # No second operation.started: "dead" had announced it (its events are not in this test).
    assert [(e["type"], e.get("step")) for e in events[:-1]] == [
        ("operation.progress", "create_role"),
        ("operation.progress", "grant_access"),
        ("operation.progress", "apply_schema"),
        ("operation.progress", "verify"),
    ]
    assert events[-1]["type"] == "operation.completed" and events[-1]["progress"] == 100
    assert [o.id for o in hooks.succeeded] == [op.id]
    assert "operation.resumed" in hooks.audit_kinds(op.id)


async def test_a_process_killed_in_the_middle_of_a_step_is_resumed_by_another(
    db_pool: asyncpg.Pool,
    serving: Serving,
    database_url: str,
    redis_url: str,
    redis: Redis,
    redis_prefix: str,
    graph_backend: GraphBackend,
    pg_admin_dsn: str,
    user_id: str,
    name_prefix: str,
) -> None:
    subject = new_subject()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    command = [
        sys.executable,
        str(Path(__file__).with_name("child_runner.py")),
        database_url,
        redis_url,
        redis_prefix,
        pg_admin_dsn,
        name_prefix,
        subject,
        user_id,
    ]
    async with await anyio.open_process(command, env=env, cwd=ROOT, stderr=None) as child:
        assert child.stdout is not None
        line = b""
        with anyio.fail_after(30):
            while not line.endswith(b"\n"):
                line += await child.stdout.receive(1)
        assert line.startswith(b"HOLDING op_"), line
        op_id = line.split()[1].decode()
        os.kill(child.pid, signal.SIGKILL)
        assert await child.wait() == -signal.SIGKILL

    async with db_pool.acquire() as conn:
        killed = await conn.fetchrow("SELECT * FROM operations WHERE id = $1", op_id)
    assert killed is not None
    assert killed["lease_owner"] == "child" and killed["status"] == "running"
    assert killed["step"] == "apply_schema"
    assert "apply_schema" not in killed["completed_steps"]

    async with serving([graph_backend], sweep_interval=0.2):
        done = await wait_for(db_pool, op_id)

    assert done.status == "completed" and done.attempts == 2 and done.progress == 100
    dbs, roles = await server_objects(pg_admin_dsn, name_prefix)
    assert dbs == [graph_backend.database_name(done.resource_id)]
    assert len(roles) == 2  # the login role and the owner of its database
    events = await operation_events(redis, redis_prefix, op_id)
    types = [e["type"] for e in events]
    assert types.count("operation.started") == 1
    assert types.count("operation.completed") == 1 and types[-1] == "operation.completed"
    steps = [e["step"] for e in events if e["type"] == "operation.progress"]
    # The child's steps up to the one it died in, then that one again and the rest.
    assert steps == [
        "check_limits",
        "create_database",
        "create_role",
        "grant_access",
        "apply_schema",
        "apply_schema",
        "verify",
    ]
    progress = [e["progress"] for e in events]
    assert progress == sorted(progress)


async def test_a_runner_that_shuts_down_hands_its_operations_over_at_once(
    db_pool: asyncpg.Pool,
    serving: Serving,
    redis: Redis,
    redis_prefix: str,
    graph_backend: GraphBackend,
    pg_admin_dsn: str,
    user_id: str,
    name_prefix: str,
) -> None:
    holding = HoldingBackend(graph_backend, hold_at="create_role")
    # A long lease: only the release on shutdown lets the next runner take the operation.
    async with serving([holding], lease_seconds=300) as first:
        op = await first.start("provision", new_subject(), user_id, GRAPH)
        with anyio.fail_after(30):
            await holding.holding.wait()
    async with db_pool.acquire() as conn:
        left = await conn.fetchrow(
            "SELECT status, lease_expires_at <= now() AS free FROM operations WHERE id = $1",
            op.id,
        )
    assert left is not None and left["status"] == "running" and left["free"]

    async with serving([graph_backend], lease_seconds=300):
        done = await wait_for(db_pool, op.id)
    assert done.status == "completed" and done.attempts == 2
    assert not holding.released
    dbs, _ = await server_objects(pg_admin_dsn, name_prefix)
    assert dbs == [graph_backend.database_name(op.resource_id)]
    types = [e["type"] for e in await operation_events(redis, redis_prefix, op.id)]
    assert types.count("operation.started") == 1 and types.count("operation.completed") == 1


async def test_a_step_completed_begins_the_next_in_the_same_write_unless_cancelled(
    db_pool: asyncpg.Pool, user_id: str
) -> None:
    """What begin_step records (the step, its progress), written with the previous step's
    completion; a cancellation asked for before leaves the next step not begun, and a lease
    gone leaves everything as it was."""
    async with db_pool.acquire() as conn:
        op = await leased_provision(conn, user_id, "me", 30)
        assert await begin_step(conn, op.id, "me", "check_limits", 0) == "begun"
        begun = await complete_and_begin(conn, op.id, "me", "check_limits", "create_database", 16)
        assert begun == "begun"
        assert await complete_and_begin(conn, op.id, "other", "x", "y", 90) == "lease_lost"
        now = await get_operation(conn, op.id)
        assert now is not None
        assert (now.step, now.progress, now.completed_steps) == (
            "create_database",
            16,
            ("check_limits",),
        )
        assert await request_cancel(conn, op.id) is not None
        stopped = await complete_and_begin(conn, op.id, "me", "create_database", "verify", 83)
        assert stopped == "cancel_requested"
        now = await get_operation(conn, op.id)
        assert now is not None
        assert (now.step, now.progress, now.completed_steps) == (
            "create_database",
            16,
            ("check_limits", "create_database"),
        )
