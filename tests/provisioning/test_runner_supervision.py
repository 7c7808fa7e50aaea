"""The runner's sweep, lease keeper and orphan reaper each survive a crash of their own."""

from __future__ import annotations

import functools
import logging
import secrets

import anyio
import asyncpg
import pytest

from provisioning import GraphBackend, OperationRunner, ResourceSpec
from streams import EventPublisher, Supervisor
from tests.provisioning.support import FAST_RETRY, RecordingHooks, new_subject, wait_for
from tests.streams.sse_client import wait_until
from tests.support.bugs import crash_once

pytestmark = pytest.mark.anyio

GRAPH = ResourceSpec("graph", "graph_standard", {"max_resources": 3, "max_connections": 5})
LOOPS = ("orphan-reaper", "operation-lease-keeper", "operation-sweep")


def break_each_loop(monkeypatch: pytest.MonkeyPatch, runner: OperationRunner) -> None:
    # The reaper handles every error of a clean-up itself: a crash of the loop as a whole.
    crash_once(monkeypatch, runner._reaper, "run")
    crash_once(monkeypatch, runner._leases, "renew")
    crash_once(monkeypatch, runner, "sweep")


def make_runner(
    pool: asyncpg.Pool,
    publisher: EventPublisher,
    hooks: RecordingHooks,
    backend: GraphBackend,
) -> OperationRunner:
    return OperationRunner(
        pool,
        publisher,
        hooks,
        [backend],
        instance_id=f"test-{secrets.token_hex(4)}",
        retry=FAST_RETRY,
        orphan_retry_seconds=0.2,
        lease_seconds=1.5,
    )


async def test_each_loop_crashing_once_leaves_the_runner_provisioning(
    db_pool: asyncpg.Pool,
    publisher: EventPublisher,
    hooks: RecordingHooks,
    graph_backend: GraphBackend,
    user_id: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner = make_runner(db_pool, publisher, hooks, graph_backend)
    break_each_loop(monkeypatch, runner)

    def crashed() -> bool:
        logged = " ".join(r.getMessage() for r in caplog.records if r.exc_info)
        return all(repr(task) in logged for task in LOOPS)

    with anyio.fail_after(40):
        async with anyio.create_task_group() as tg:
            # As a caller that hands in no supervisor: the runner has one of its own.
            await tg.start(runner.run)
            first = await runner.start("provision", new_subject(), user_id, GRAPH)
            await wait_until(crashed, within=20)
            assert (await wait_for(db_pool, first.id)).status == "completed"
            op = await runner.start("provision", new_subject(), user_id, GRAPH)
            assert (await wait_for(db_pool, op.id)).status == "completed"
            tg.cancel_scope.cancel()
    crashes = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert len(crashes) == len(LOOPS)


async def test_the_runner_reports_its_loops_to_the_process_supervisor(
    db_pool: asyncpg.Pool,
    publisher: EventPublisher,
    hooks: RecordingHooks,
    graph_backend: GraphBackend,
    user_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    supervisor = Supervisor(backoff_min=0.01, backoff_max=0.05)
    runner = make_runner(db_pool, publisher, hooks, graph_backend)
    break_each_loop(monkeypatch, runner)
    with anyio.fail_after(40):
        async with anyio.create_task_group() as tg:
            await tg.start(functools.partial(runner.run, supervisor=supervisor))
            op = await runner.start("provision", new_subject(), user_id, GRAPH)
            await wait_until(lambda: all(supervisor.restarts.get(t) == 1 for t in LOOPS))
            assert (await wait_for(db_pool, op.id)).status == "completed"
            assert supervisor.failing() == []
            tg.cancel_scope.cancel()
