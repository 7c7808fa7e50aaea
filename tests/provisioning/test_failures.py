"""Failures and cancellations end in one terminal event, a customer sentence and no leftovers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import anyio
import asyncpg
import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from provisioning import (
    TERMINAL_EVENT_TYPES,
    GraphBackend,
    OperationNotCancellable,
    OperationNotFound,
    ResourceSpec,
    StepContext,
    get_operation,
)
from provisioning.resources import get_resource
from streams import EventPublisher
from tests.provisioning.support import (
    FAST_RETRY,
    HoldingBackend,
    RecordingHooks,
    Serving,
    new_subject,
    operation_events,
    running,
    server_objects,
    user_events,
    wait_for,
)
from tests.support import free_port
from tests.support.redis_server import redis_process

pytestmark = pytest.mark.anyio

GRAPH = ResourceSpec("graph", "graph_standard", {"max_resources": 3})
# A retry window of 0: an unreachable server fails the operation after the quick retries.
NO_WAITING = replace(FAST_RETRY, outage_window=0)


async def test_a_server_that_refuses_connections_fails_the_operation_after_the_retry_window(
    db_pool: asyncpg.Pool,
    redis: Redis,
    redis_prefix: str,
    hooks: RecordingHooks,
    serving: Serving,
    pg_admin_dsn: str,
    user_id: str,
    name_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    closed = f"postgresql://postgres:s3cret-admin@127.0.0.1:{free_port()}/postgres"
    backend = GraphBackend(closed, name_prefix=name_prefix, connect_timeout=2)
    async with serving([backend], retry=NO_WAITING) as runner:
        op = await runner.start("provision", new_subject(), user_id, GRAPH)
        done = await wait_for(db_pool, op.id)

    assert done.status == "failed" and done.step == "create_database"
    assert done.completed_steps == ("check_limits",)
    assert done.error is not None and done.error.endswith(".")
    assert "could not be reached" in done.error
    for leak in ("127.0.0.1", "postgresql", "s3cret", "Traceback", "Error"):
        assert leak not in done.error
    assert [(o.id, message) for o, message in hooks.failed] == [(op.id, done.error)]
    assert hooks.succeeded == []
    # Three tries of the step (FAST_RETRY), then three of the rollback: two waits each.
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 4
    assert all("s3cret" not in r.getMessage() for r in caplog.records)

    events = await operation_events(redis, redis_prefix, op.id)
    assert [e["type"] for e in events][-1] == "operation.failed"
    assert sum(e["type"].startswith("operation.") and "status" in e for e in events) == 1
    assert events[-1]["error"] == done.error and events[-1]["status"] == "failed"
    assert await server_objects(pg_admin_dsn, name_prefix) == ([], [])
    # Nothing could be checked on that server: the resource is flagged for a later clean-up.
    async with db_pool.acquire() as conn:
        resource = await get_resource(conn, op.resource_id)
    assert resource is not None and resource.status == "orphaned"
    assert hooks.audit_kinds(op.id) == [
        "operation.started",
        "operation.rollback_failed",
        "operation.failed",
    ]


async def test_cancel_stops_the_running_step_and_leaves_nothing(
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
    holding = HoldingBackend(graph_backend, hold_at="apply_schema")
    async with serving([holding]) as runner:
        op = await runner.start("provision", new_subject(), user_id, GRAPH)
        with anyio.fail_after(30):
            await holding.holding.wait()
        # Mid-step, the database and the role exist.
        assert len((await server_objects(pg_admin_dsn, name_prefix))[0]) == 1
        answer = await runner.cancel(op.id)
        assert op.id not in runner.active
        again = await runner.cancel(op.id)

    assert answer.status == "cancelled" and again.status == "cancelled"
    assert not holding.released  # the step was interrupted, not left to finish
    assert await server_objects(pg_admin_dsn, name_prefix) == ([], [])
    done = await wait_for(db_pool, op.id)
    assert done.error is None and done.step == "apply_schema"
    async with db_pool.acquire() as conn:
        resource = await get_resource(conn, op.resource_id)
    assert resource is not None and resource.status == "deleted"
    events = await operation_events(redis, redis_prefix, op.id)
    assert events[-1]["type"] == "operation.cancelled" and events[-1]["status"] == "cancelled"
    terminal = [
        e
        for e in events
        if e["type"] in ("operation.completed", "operation.failed", "operation.cancelled")
    ]
    assert len(terminal) == 1
    assert [o.id for o, _ in hooks.failed] == [op.id]
    assert "cancelled" in hooks.failed[0][1]
    assert hooks.audit_kinds(op.id) == [
        "operation.started",
        "operation.cancel_requested",
        "operation.cancelled",
    ]


async def test_cancel_answers_unknown_and_uncancellable_operations(
    db_pool: asyncpg.Pool,
    serving: Serving,
    graph_backend: GraphBackend,
    user_id: str,
) -> None:
    subject = new_subject()
    async with serving([graph_backend]) as runner:
        with pytest.raises(OperationNotFound):
            await runner.cancel("op_000000000000000000000000")
        provision = await runner.start("provision", subject, user_id, GRAPH)
        await wait_for(db_pool, provision.id)
        assert (await runner.cancel(provision.id)).status == "completed"
    holding = HoldingBackend(graph_backend, hold_at="drop_database")
    async with serving([holding]) as runner:
        op = await runner.start("deprovision", subject, user_id, GRAPH)
        with anyio.fail_after(30):
            await holding.holding.wait()
        with pytest.raises(OperationNotCancellable):
            await runner.cancel(op.id)
        holding.release.set()
        assert (await wait_for(db_pool, op.id)).status == "completed"


async def test_a_failing_hook_is_called_again_later_and_the_event_goes_out_once(
    db_pool: asyncpg.Pool,
    redis: Redis,
    redis_prefix: str,
    publisher: EventPublisher,
    graph_backend: GraphBackend,
    user_id: str,
) -> None:
    hooks = RecordingHooks(succeeded_failures=2)
    options = {"finalize_retry_seconds": 0.0, "sweep_interval": 0.05}
    async with running(db_pool, publisher, hooks, [graph_backend], **options) as runner:
        op = await runner.start("provision", new_subject(), user_id, GRAPH)
        done = await wait_for(db_pool, op.id)

    assert done.status == "completed" and done.reported_at and done.announced_at
    assert [o.id for o in hooks.succeeded] == [op.id]
    assert hooks.audit_kinds(op.id).count("operation.hook_failed") == 2
    types = [e["type"] for e in await operation_events(redis, redis_prefix, op.id)]
    assert types.count("operation.completed") == 1 and types[-1] == "operation.completed"


@pytest.mark.timeout(90)
async def test_an_operation_finishing_while_redis_is_down_ends_its_stream_once_redis_is_back(
    db_pool: asyncpg.Pool,
    redis_prefix: str,
    hooks: RecordingHooks,
    graph_backend: GraphBackend,
    user_id: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with redis_process(tmp_path / "redis") as server:
        await server.wait_ready()
        # No retries inside the client (redis-py's default backs off ~4 s per call): the
        # runner's own retries are what this test is about.
        redis = Redis(port=server.port, retry=Retry(NoBackoff(), 0))
        publisher = EventPublisher(redis, prefix=redis_prefix, terminal_types=TERMINAL_EVENT_TYPES)
        holding = HoldingBackend(graph_backend, hold_at="apply_schema")
        options = {"finalize_retry_seconds": 0.2, "sweep_interval": 0.05}
        try:
            async with running(db_pool, publisher, hooks, [holding], **options) as runner:
                op = await runner.start("provision", new_subject(), user_id, GRAPH)
                with anyio.fail_after(30):
                    await holding.holding.wait()
                server.kill()
                holding.release.set()  # its last step and its outcome happen with Redis away
                finished = await wait_for(db_pool, op.id, lambda o: o.reported_at is not None)
                assert finished.status == "completed" and finished.announced_at is None
                # Offered again every 0.2 s while Redis is away: not given up, not marked done.
                await anyio.sleep(1.5)
                async with db_pool.acquire() as conn:
                    still = await get_operation(conn, op.id)
                assert still is not None and still.finalized_at is None
                tries = [r for r in caplog.records if "terminal event not published" in r.message]
                assert len(tries) >= 2
                server.start()
                await server.wait_ready()
                done = await wait_for(db_pool, op.id)
            ours = await operation_events(redis, redis_prefix, op.id)
            mine = [
                e
                for e in await user_events(redis, redis_prefix, user_id)
                if e.get("operation_id") == op.id
            ]
        finally:
            await redis.aclose()

    assert done.status == "completed" and done.announced_at is not None
    assert [o.id for o in hooks.succeeded] == [op.id]  # the hook was told once
    for events in (ours, mine):
        types = [e["type"] for e in events]
        assert types[0] == "operation.started", types
        assert types[-1] == "operation.completed", types
        assert types.count("operation.completed") == 1, types
        # The progress published while Redis was away is lost (docs/ARCHITECTURE.md, "Redis
        # away while operations run"): what is kept stays in order.
        progress = [e["progress"] for e in events if "progress" in e]
        assert progress == sorted(progress)


async def test_cancel_reaches_an_operation_that_runs_on_another_instance(
    db_pool: asyncpg.Pool,
    serving: Serving,
    redis: Redis,
    redis_prefix: str,
    graph_backend: GraphBackend,
    pg_admin_dsn: str,
    user_id: str,
    name_prefix: str,
) -> None:
    holding = HoldingBackend(graph_backend, hold_at="grant_access")
    async with (
        serving([holding], lease_seconds=0.6) as worker,
        serving([graph_backend]) as other,
    ):
        op = await worker.start("provision", new_subject(), user_id, GRAPH)
        with anyio.fail_after(30):
            await holding.holding.wait()
        answer = await other.cancel(op.id)
        assert answer.cancel_requested and answer.status == "running"
        done = await wait_for(db_pool, op.id)
        # Its task ends right after the outcome is recorded.
        with anyio.fail_after(5):
            while op.id in worker.active:  # noqa: ASYNC110 (the runner offers no event)
                await anyio.sleep(0.02)

    assert done.status == "cancelled" and done.lease_owner == worker.instance_id
    assert not holding.released
    assert await server_objects(pg_admin_dsn, name_prefix) == ([], [])
    types = [e["type"] for e in await operation_events(redis, redis_prefix, op.id)]
    assert types[-1] == "operation.cancelled" and types.count("operation.cancelled") == 1


async def test_leftovers_of_a_failed_rollback_are_removed_once_the_server_answers(
    db_pool: asyncpg.Pool,
    hooks: RecordingHooks,
    serving: Serving,
    graph_backend: GraphBackend,
    pg_admin_dsn: str,
    user_id: str,
    name_prefix: str,
) -> None:
    # The server is down: the provision fails and its rollback cannot run either.
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    down = GraphBackend(closed, name_prefix=name_prefix, connect_timeout=2)
    async with serving([down], retry=NO_WAITING) as runner:
        op = await runner.start("provision", new_subject(), user_id, GRAPH)
        assert (await wait_for(db_pool, op.id)).status == "failed"
    # Say a CREATE DATABASE had gone through before the server went away.
    ctx_step = graph_backend.steps("provision")[0]
    await ctx_step.run(
        StepContext(op.id, "provision", op.subject_id, user_id, op.resource_id, GRAPH)
    )
    assert len((await server_objects(pg_admin_dsn, name_prefix))[0]) == 1

    options = {"orphan_retry_seconds": 0.05}
    async with serving([graph_backend], **options):
        with anyio.fail_after(30):
            while True:
                async with db_pool.acquire() as conn:
                    resource = await get_resource(conn, op.resource_id)
                if resource is not None and resource.status == "deleted":
                    break
                await anyio.sleep(0.05)

    assert await server_objects(pg_admin_dsn, name_prefix) == ([], [])
    assert any(kind == "resource.orphan_removed" for kind, *_ in hooks.audits)
