"""The level-triggered side of access follows payment (`app.billing.access`): the end of a
grace period is no event, and a decision a crash interrupted is taken again."""

from __future__ import annotations

import logging
from datetime import timedelta

import anyio
import asyncpg

from app.billing.access import SUSPENDED_STATUSES
from app.billing.errors import OUTAGES
from app.billing.lifecycle import Lifecycle
from app.billing.subscriptions import ACTIVE_RESOURCE_STATUSES

__all__ = ["AccessSweep"]

logger = logging.getLogger(__name__)

# The end of a grace period is found within this (a day-long grace does not need better).
SWEEP_SECONDS = 60.0
# Subscriptions examined per sweep; the next sweep takes the rest.
BATCH = 100

# Subscriptions whose resource's access is not what their status requires, with no
# operation under way: `$1` is the grace in seconds.
_CANDIDATES = """
SELECT s.id FROM subscriptions s
  JOIN LATERAL (SELECT r.status FROM resources r WHERE r.subject_id = s.id
                 AND r.status IN ('active', 'suspended')
                 ORDER BY r.created_at DESC LIMIT 1) r ON true
 WHERE s.status = ANY($2::text[])
   AND NOT EXISTS (SELECT FROM operations o WHERE o.subject_id = s.id AND o.finished_at IS NULL)
   AND (s.status = ANY($3::text[])
        OR (s.status = 'past_due'
            AND coalesce(s.past_due_since, s.updated_at) + make_interval(secs => $1::float8)
                <= now()))
       IS DISTINCT FROM (r.status = 'suspended')
 ORDER BY s.updated_at
 LIMIT $4
"""


class AccessSweep:
    """Every `sweep_seconds`, suspends the resources whose grace has ended and repairs any
    other disagreement between a status and its resource's access (see the module)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        lifecycle: Lifecycle,
        *,
        sweep_seconds: float = SWEEP_SECONDS,
    ) -> None:
        self._pool = pool
        self._lifecycle = lifecycle
        self._sweep_seconds = sweep_seconds

    async def run(self) -> None:
        while True:
            try:
                await self.sweep_once()
            except OUTAGES as exc:
                logger.warning("the access sweep failed (%r); retrying at the next one", exc)
            await anyio.sleep(self._sweep_seconds)

    async def sweep_once(self, *, grace: timedelta | None = None) -> list[str]:
        """One sweep, with `grace` instead of the configured one if given (how a test ends a
        grace period without waiting days). Answers the operations it started."""
        grace = self._lifecycle.past_due_grace if grace is None else grace
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                _CANDIDATES,
                grace.total_seconds(),
                list(ACTIVE_RESOURCE_STATUSES),
                list(SUSPENDED_STATUSES),
                BATCH,
            )
        started = []
        for row in rows:
            op = await self._lifecycle.converge_access(row["id"], grace=grace, reason="sweep")
            if op is not None:
                started.append(op.id)
        return started
