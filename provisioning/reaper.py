"""Removes what a failed rollback or deprovision left behind, once the server answers again."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import anyio
import asyncpg

from .backend import ProvisionerBackend
from .hooks import SubscriptionHooks
from .resources import claim_orphans, mark_deleted

__all__ = ["OrphanReaper"]

logger = logging.getLogger(__name__)


class OrphanReaper:
    """Every ``interval`` seconds, tears down up to ``batch`` resources marked ``orphaned``.

    A resource is orphaned when its rollback or deprovisioning gave up (the provisioner server
    was unreachable, say). Teardown is idempotent, so trying again is always safe; claiming
    touches ``updated_at``, so that instances do not work on the same one at once.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        hooks: SubscriptionHooks,
        backends: Mapping[str, ProvisionerBackend],
        *,
        interval: float = 60.0,
        batch: int = 5,
    ) -> None:
        self._pool = pool
        self._hooks = hooks
        self._backends = backends
        self._interval = interval
        self._batch = batch

    async def run(self) -> None:
        while True:
            await anyio.sleep(self._interval)
            try:
                await self.reap_once()
            except Exception as exc:
                logger.warning("orphan clean-up failed (%s)", type(exc).__name__)

    async def reap_once(self) -> int:
        """Answers how many orphaned resources were removed."""
        async with self._pool.acquire() as conn:
            orphans = await claim_orphans(conn, older_than=self._interval, limit=self._batch)
        removed = 0
        for resource in orphans:
            backend = self._backends.get(resource.resource_type)
            if backend is None:
                continue
            try:
                await backend.teardown(resource.id)
            except Exception as exc:
                logger.warning("orphaned %s not removed yet (%s)", resource.id, type(exc).__name__)
                continue
            async with self._pool.acquire() as conn:
                if not await mark_deleted(conn, resource.id):
                    continue
            removed += 1
            logger.info("removed orphaned %s %s", resource.resource_type, resource.id)
            try:
                await self._hooks.audit(
                    "resource.orphan_removed",
                    subject_id=resource.subject_id,
                    user_id=resource.user_id,
                    detail={"resource_id": resource.id, "resource_type": resource.resource_type},
                )
            except Exception:
                logger.exception("audit of the removal of %s failed", resource.id)
        return removed
