"""A runner in a process of its own, for the crash test: it starts a provision, holds it in the
middle of a step, and prints ``HOLDING <operation id>`` so that the test can SIGKILL it there.

    python child_runner.py DATABASE_URL REDIS_URL REDIS_PREFIX ADMIN_DSN NAME_PREFIX SUBJECT USER
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import replace

import anyio
import asyncpg
from redis.asyncio import Redis

from provisioning import (
    TERMINAL_EVENT_TYPES,
    GraphBackend,
    OperationRunner,
    ResourceSpec,
    RetryPolicy,
    Step,
)
from provisioning.backend import OperationKind, StepContext
from streams import EventPublisher
from tests.provisioning.support import RecordingHooks

HOLD_AT = "apply_schema"
LEASE_SECONDS = 1.0


class HoldingGraphBackend(GraphBackend):
    """Runs ``HOLD_AT`` for real, then never records it: the process is killed there."""

    def __init__(self, admin_dsn: str, *, name_prefix: str, held: anyio.Event) -> None:
        super().__init__(admin_dsn, name_prefix=name_prefix)
        self._held = held

    def steps(self, kind: OperationKind) -> Sequence[Step]:
        return [self._hold(s) if s.name == HOLD_AT else s for s in super().steps(kind)]

    def _hold(self, step: Step) -> Step:
        async def run(ctx: StepContext) -> None:
            await step.run(ctx)
            self._held.set()
            await anyio.sleep_forever()

        return replace(step, run=run)


async def main(argv: list[str]) -> None:
    database_url, redis_url, prefix, admin_dsn, name_prefix, subject, user = argv
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    held = anyio.Event()
    runner = OperationRunner(
        pool,
        EventPublisher(
            Redis.from_url(redis_url), prefix=prefix, terminal_types=TERMINAL_EVENT_TYPES
        ),
        RecordingHooks(),
        [HoldingGraphBackend(admin_dsn, name_prefix=name_prefix, held=held)],
        instance_id="child",
        lease_seconds=LEASE_SECONDS,
        retry=RetryPolicy(attempts=2, initial_delay=0.01),
    )
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        spec = ResourceSpec("graph", "graph_standard")
        op = await runner.start("provision", subject, user, spec)
        await held.wait()
        print(f"HOLDING {op.id}", flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1:])
