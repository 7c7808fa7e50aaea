"""Operations converge through faults: a cancellation stops the next step wherever it was asked,
a stalled instance undoes nothing that another completed, an unreachable provisioning server
is waited out instead of failing the customer."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

import anyio
import asyncpg
import pytest
from redis.asyncio import Redis

from bench.chaos.proxy import fault_proxy, url_through
from provisioning import (
    GraphBackend,
    ProvisionerBackend,
    ProvisioningError,
    ResourceSpec,
    RetryPolicy,
    Step,
    StepContext,
    get_operation,
)
from provisioning.backend import OperationKind
from provisioning.leases import INSTANCE_LOCK_CLASS
from tests.provisioning.support import (
    HoldingBackend,
    RecordingHooks,
    Serving,
    WrappedBackend,
    new_subject,
    operation_events,
    server_objects,
    wait_for,
)

pytestmark = pytest.mark.anyio

GRAPH = ResourceSpec("graph", "graph_standard", {"max_resources": 3})


async def test_a_cancellation_requested_elsewhere_stops_the_provision_before_its_next_step(
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
    holding = HoldingBackend(graph_backend, hold_at="grant_access")
    # A long lease: the worker's lease keeper would see the request only 10 s later.
    async with (
        serving([holding], lease_seconds=30) as worker,
        serving([graph_backend]) as other,
    ):
        op = await worker.start("provision", new_subject(), user_id, GRAPH)
        with anyio.fail_after(30):
            await holding.holding.wait()
        asked = await other.cancel(op.id, wait=0)
        assert asked.cancel_requested and asked.status == "running"
        # The step under way finishes; the next one must not begin.
        holding.release.set()
        done = await wait_for(db_pool, op.id, limit=8)

    assert done.status == "cancelled" and done.lease_owner == worker.instance_id
    assert holding.released
    assert "apply_schema" not in done.completed_steps and done.step == "grant_access"
    assert await server_objects(pg_admin_dsn, name_prefix) == ([], [])
    events = await operation_events(redis, redis_prefix, op.id)
    assert [e["step"] for e in events if e["type"] == "operation.progress"][-1] == "grant_access"
    assert [e["type"] for e in events][-1] == "operation.cancelled"
    assert [o.id for o, _ in hooks.failed] == [op.id]


class FailingAfterHold(HoldingBackend):
    """``hold_at`` runs for real, waits on ``release``, then fails for good (a bug, a refused
    privilege): the instance running it rolls the provision back."""

    def _wrap(self, step: Step) -> Step:
        held = super()._wrap(step)

        async def run(ctx: StepContext) -> None:
            await held.run(ctx)
            raise ProvisioningError("This step failed on the stalled instance.")

        return replace(step, run=run)


async def test_a_stalled_instance_does_not_roll_back_what_another_took_over(
    db_pool: asyncpg.Pool,
    serving: Serving,
    redis: Redis,
    redis_prefix: str,
    graph_backend: GraphBackend,
    pg_admin_dsn: str,
    user_id: str,
    name_prefix: str,
) -> None:
    stalled = FailingAfterHold(graph_backend, hold_at="apply_schema")
    async with serving([stalled], lease_seconds=300) as first:
        op = await first.start("provision", new_subject(), user_id, GRAPH)
        with anyio.fail_after(30):
            await stalled.holding.wait()
        # The first instance stalls past its lease (as a paused process would: its keeper
        # renews every 100 s) while its step is under way.
        await db_pool.execute(
            "UPDATE operations SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
            op.id,
        )
        async with serving([graph_backend], sweep_interval=0.1):
            # Long enough for the second instance to take the operation over and finish it,
            # were it allowed to while the first one's step runs.
            await anyio.sleep(3)
            stalled.release.set()
            done = await wait_for(db_pool, op.id, limit=30)
            # Whatever the first instance does once it wakes up, it has done it by then.
            with anyio.fail_after(30):
                while op.id in first.active:  # noqa: ASYNC110 (the runner offers no event)
                    await anyio.sleep(0.05)

    dbs, roles = await server_objects(pg_admin_dsn, name_prefix)
    if done.status == "completed":
        # The login role and the database's NOLOGIN owner role.
        assert dbs == [graph_backend.database_name(op.resource_id)]
        assert sorted(roles) == sorted(
            [graph_backend.role_name(op.resource_id), graph_backend.owner_name(op.resource_id)]
        )
    else:
        assert (dbs, roles) == ([], [])
    types = [e["type"] for e in await operation_events(redis, redis_prefix, op.id)]
    terminal = [t for t in types if t in ("operation.completed", "operation.failed")]
    assert len(terminal) == 1


class CountingBackend(WrappedBackend):
    """Counts the runs of each step of a real backend."""

    def __init__(self, inner: ProvisionerBackend) -> None:
        super().__init__(inner)
        self.runs: dict[str, int] = {}

    def steps(self, kind: OperationKind) -> Sequence[Step]:
        return [self._count(s) for s in self.inner.steps(kind)]

    def _count(self, step: Step) -> Step:
        async def run(ctx: StepContext) -> None:
            self.runs[step.name] = self.runs.get(step.name, 0) + 1
            await step.run(ctx)

        return replace(step, run=run)


WAITING_RETRY = RetryPolicy(
    attempts=2, initial_delay=0.01, max_delay=0.2, outage_window=60, outage_max_delay=0.5
)


async def test_an_unreachable_provisioner_is_waited_out_and_the_provision_completes(
    db_pool: asyncpg.Pool,
    redis: Redis,
    redis_prefix: str,
    hooks: RecordingHooks,
    serving: Serving,
    pg_admin_dsn: str,
    user_id: str,
    name_prefix: str,
) -> None:
    async with fault_proxy("provisioner", pg_admin_dsn) as proxy:
        backend = CountingBackend(
            GraphBackend(
                url_through(pg_admin_dsn, proxy.port), name_prefix=name_prefix, connect_timeout=2
            )
        )
        await proxy.refuse()
        async with serving([backend], retry=WAITING_RETRY) as runner:
            op = await runner.start("provision", new_subject(), user_id, GRAPH)
            waiting = await wait_for(
                db_pool, op.id, lambda o: o.status not in ("pending", "running"), limit=20
            )
            assert waiting.status == "waiting", waiting
            assert waiting.snapshot()["status"] == "waiting"
            # Down for a while: far more tries than the quick retries, and still waiting.
            await anyio.sleep(3)
            async with db_pool.acquire() as conn:
                still = await get_operation(conn, op.id)
            assert still is not None and still.status == "waiting" and hooks.failed == []
            assert backend.runs["create_database"] > WAITING_RETRY.attempts

            await proxy.accept()
            back = time.monotonic()
            done = await wait_for(db_pool, op.id, limit=30)
            recovered = time.monotonic() - back
    print(f"\nMEASURED provisioner back -> waiting provision completed: {recovered:.2f} s")

    assert done.status == "completed" and done.progress == 100
    assert hooks.failed == [] and [o.id for o in hooks.succeeded] == [op.id]
    assert recovered < 5
    events = await operation_events(redis, redis_prefix, op.id)
    waits = [e for e in events if e["type"] == "operation.waiting"]
    assert waits
    for event in waits:
        assert {"type", "ts", "operation_id", "retry_at", "message"} <= event.keys()
        assert event["operation_id"] == op.id and event["retry_at"].endswith("Z")
        assert event["message"].startswith("The database server is not answering; retrying in")
        assert event["message"].endswith(" s")
    types = [e["type"] for e in events]
    assert types.index("operation.waiting") < types.index("operation.completed")
    after = types[len(types) - 1 - types[::-1].index("operation.waiting") + 1]
    assert after == "operation.progress"  # running again
    progress = [e["progress"] for e in events if "progress" in e]
    assert progress == sorted(progress)
    dbs, roles = await server_objects(pg_admin_dsn, name_prefix)
    graph = backend.inner
    assert isinstance(graph, GraphBackend)
    assert dbs == [graph.database_name(op.resource_id)]
    assert sorted(roles) == sorted(
        [graph.role_name(op.resource_id), graph.owner_name(op.resource_id)]
    )


async def test_the_provision_fails_once_the_retry_window_has_passed(
    db_pool: asyncpg.Pool,
    redis: Redis,
    redis_prefix: str,
    hooks: RecordingHooks,
    serving: Serving,
    pg_admin_dsn: str,
    user_id: str,
    name_prefix: str,
) -> None:
    retry = replace(WAITING_RETRY, outage_window=2)
    async with fault_proxy("provisioner", pg_admin_dsn) as proxy:
        backend = GraphBackend(url_through(pg_admin_dsn, proxy.port), name_prefix=name_prefix)
        await proxy.refuse()
        async with serving([backend], retry=retry) as runner:
            started = time.monotonic()
            op = await runner.start("provision", new_subject(), user_id, GRAPH)
            done = await wait_for(db_pool, op.id, limit=30)
            took = time.monotonic() - started

    assert done.status == "failed" and took >= 2
    assert done.error is not None and "could not be reached" in done.error
    assert [(o.id, message) for o, message in hooks.failed] == [(op.id, done.error)]
    types = [e["type"] for e in await operation_events(redis, redis_prefix, op.id)]
    assert "operation.waiting" in types and types[-1] == "operation.failed"


async def _lock_holder(pool: asyncpg.Pool, owner: str) -> int | None:
    pid: int | None = await pool.fetchval(
        "SELECT l.pid FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted"
        " AND l.classid = $1::oid AND l.objid = hashtext($2)::oid AND l.objsubid = 2"
        " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        INSTANCE_LOCK_CLASS,
        owner,
    )
    return pid


async def test_the_instance_lock_is_taken_again_when_its_connection_is_terminated(
    db_pool: asyncpg.Pool,
    serving: Serving,
    graph_backend: GraphBackend,
    user_id: str,
) -> None:
    async with serving([graph_backend]) as runner:
        first = await _lock_holder(db_pool, runner.instance_id)
        assert first is not None
        # Only this test database's backend that holds the lock.
        assert await db_pool.fetchval("SELECT pg_terminate_backend($1, 5000)", first)
        with anyio.fail_after(10):
            while True:
                again = await _lock_holder(db_pool, runner.instance_id)
                if again is not None and again != first:
                    break
                await anyio.sleep(0.05)
        op = await runner.start("provision", new_subject(), user_id, GRAPH)
        assert (await wait_for(db_pool, op.id)).status == "completed"
