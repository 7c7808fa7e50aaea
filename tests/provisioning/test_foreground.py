"""Operations give way to the foreground (a webhook burst), but are never starved by it."""

from __future__ import annotations

import anyio
import asyncpg
import pytest
from redis.asyncio import Redis

from provisioning import (
    GraphBackend,
    OperationRecord,
    OperationRunner,
    ResourceSpec,
    get_operation,
)
from tests.provisioning.support import Serving, new_subject, operation_events, wait_for

pytestmark = pytest.mark.anyio

GRAPH = ResourceSpec("graph", "graph_standard", {"max_resources": 3, "max_connections": 5})


class BusyForeground:
    """A `Foreground` double: busy until `finish` is set."""

    def __init__(self) -> None:
        self.finish = anyio.Event()
        self.waited_on = anyio.Event()
        self.asked = 0

    async def quiet(self) -> None:
        self.asked += 1
        self.waited_on.set()
        await self.finish.wait()


async def _start_behind(
    runner: OperationRunner, burst: BusyForeground, user_id: str
) -> OperationRecord:
    """Starts a provision and answers it once it waits for the burst to end."""
    op = await runner.start("provision", new_subject(), user_id, GRAPH)
    with anyio.fail_after(10):
        await burst.waited_on.wait()
    return op


async def test_an_operation_is_announced_at_once_and_steps_in_once_the_burst_is_over(
    db_pool: asyncpg.Pool,
    serving: Serving,
    redis: Redis,
    redis_prefix: str,
    graph_backend: GraphBackend,
    user_id: str,
) -> None:
    burst = BusyForeground()
    async with serving([graph_backend], give_way_to=burst, give_way_seconds=30) as runner:
        op = await _start_behind(runner, burst, user_id)
        await anyio.sleep(0.3)  # long enough for a first step to have begun, were it let
        async with db_pool.acquire() as conn:
            waiting = await get_operation(conn, op.id)
        assert waiting is not None and waiting.status == "pending" and waiting.step is None
        events = await operation_events(redis, redis_prefix, op.id)
        assert [e["type"] for e in events] == ["operation.started"]

        burst.finish.set()
        done = await wait_for(db_pool, op.id)
    assert done.status == "completed"
    events = await operation_events(redis, redis_prefix, op.id)
    assert events[-1]["type"] == "operation.completed"


async def test_sustained_foreground_work_delays_an_operation_but_does_not_starve_it(
    db_pool: asyncpg.Pool,
    serving: Serving,
    graph_backend: GraphBackend,
    user_id: str,
) -> None:
    never_quiet = BusyForeground()
    async with serving([graph_backend], give_way_to=never_quiet, give_way_seconds=0.2) as runner:
        op = await runner.start("provision", new_subject(), user_id, GRAPH)
        done = await wait_for(db_pool, op.id)
    assert done.status == "completed"
    assert never_quiet.asked == 1 and not never_quiet.finish.is_set()


async def test_cancelling_an_operation_that_gives_way_rolls_back_at_once(
    db_pool: asyncpg.Pool,
    serving: Serving,
    graph_backend: GraphBackend,
    user_id: str,
) -> None:
    burst = BusyForeground()
    async with serving([graph_backend], give_way_to=burst, give_way_seconds=30) as runner:
        op = await _start_behind(runner, burst, user_id)
        await runner.cancel(op.id)
        done = await wait_for(db_pool, op.id, limit=10)
    assert done.status == "cancelled"
    assert done.completed_steps == ()
