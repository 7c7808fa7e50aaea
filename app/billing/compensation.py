"""What billing does when provisioning ends: activate, or fail and stop charging at once.

A failed provisioning cancels the Stripe subscription immediately (not at period end) under one
idempotency key however often it is retried. The cancellation is recorded first, in the same
transaction that marks the subscription failed, so a cancellation that fails, or a process
that dies before trying, is retried by the sweep and visible in the audit log meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import anyio
import asyncpg

from app.audit import record_audit
from app.billing.lifecycle import Lifecycle
from app.billing.provider import PaymentProvider, PaymentProviderError
from app.billing.subscriptions import (
    get_subscription,
    queue_stripe_cancellation,
    set_subscription_fields,
)
from app.billing.updates import publish_subscription
from provisioning import OperationRecord
from streams import EventPublisher

__all__ = ["BillingHooks", "cancellation_key"]

logger = logging.getLogger(__name__)

SWEEP_SECONDS = 10.0
MAX_BACKOFF_SECONDS = 600


def cancellation_key(subscription_id: str) -> str:
    return f"lookout-cancel-failed-provisioning-{subscription_id}"


class BillingHooks:
    """`provisioning.SubscriptionHooks`, as billing implements it."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        provider: PaymentProvider,
        publisher: EventPublisher,
        lifecycle: Lifecycle,
    ) -> None:
        self._pool = pool
        self._provider = provider
        self._publisher = publisher
        self._lifecycle = lifecycle

    async def provisioning_succeeded(self, operation: OperationRecord) -> None:
        await self._lifecycle.set_status(
            operation.subject_id,
            "active",
            only_from=frozenset({"provisioning"}),
            reason=f"operation {operation.id} completed",
        )

    async def provisioning_failed(self, operation: OperationRecord, customer_message: str) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            before = await get_subscription(conn, operation.subject_id, for_update=True)
            if before is None:
                return
            after = before
            if before.status in ("pending_payment", "provisioning"):
                after = await set_subscription_fields(conn, before.id, status="failed")
                await record_audit(
                    conn,
                    "subscription.failed",
                    user_id=after.user_id,
                    subject_id=after.id,
                    detail={"operation_id": operation.id, "error": customer_message},
                )
            if after.stripe_subscription_id:
                await queue_stripe_cancellation(conn, after.id, after.stripe_subscription_id)
        await publish_subscription(self._publisher, after, before)
        await self.cancel_due(subscription_id=after.id)

    async def audit(
        self,
        kind: str,
        *,
        subject_id: str | None,
        user_id: str | None,
        detail: Mapping[str, Any],
    ) -> None:
        async with self._pool.acquire() as conn:
            await record_audit(conn, kind, user_id=user_id, subject_id=subject_id, detail=detail)

    async def cancel_due(self, *, subscription_id: str | None = None) -> int:
        """Tries the pending cancellations that are due (or the one of `subscription_id`)."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT subscription_id, stripe_subscription_id, attempts"
                " FROM stripe_cancellations WHERE done_at IS NULL AND next_attempt_at <= now()"
                " AND ($1::text IS NULL OR subscription_id = $1)",
                subscription_id,
            )
        for row in rows:
            await self._cancel_one(
                row["subscription_id"], row["stripe_subscription_id"], row["attempts"]
            )
        return len(rows)

    async def _cancel_one(self, subscription_id: str, stripe_id: str, attempts: int) -> None:
        try:
            await self._provider.cancel_subscription_now(
                stripe_id, idempotency_key=cancellation_key(subscription_id)
            )
        except PaymentProviderError as exc:
            backoff = min(2 ** (attempts + 1), MAX_BACKOFF_SECONDS)
            logger.warning(
                "cancelling Stripe subscription %s failed (%s); retrying in %ds",
                stripe_id,
                exc,
                backoff,
            )
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "UPDATE stripe_cancellations SET attempts = attempts + 1, last_error = $2,"
                    " next_attempt_at = now() + make_interval(secs => $3)"
                    " WHERE subscription_id = $1",
                    subscription_id,
                    str(exc)[:2000],
                    float(backoff),
                )
                await record_audit(
                    conn,
                    "stripe.cancel_failed",
                    subject_id=subscription_id,
                    detail={"stripe_subscription_id": stripe_id, "error": str(exc)[:500]},
                )
            return
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE stripe_cancellations SET done_at = now(), attempts = attempts + 1"
                " WHERE subscription_id = $1",
                subscription_id,
            )
            await record_audit(
                conn,
                "stripe.canceled",
                subject_id=subscription_id,
                detail={"stripe_subscription_id": stripe_id, "reason": "provisioning failed"},
            )

    async def run_sweeps(self) -> None:
        """Retries failed cancellations until cancelled."""
        while True:
            try:
                await self.cancel_due()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                logger.exception("the Stripe cancellation sweep failed; retrying")
            await anyio.sleep(SWEEP_SECONDS)
