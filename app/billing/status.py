"""Moving a subscription from one status to another, audited and announced: what needs no
provisioning (compensation, the webhook handlers, the checkout return) calls it directly."""

from __future__ import annotations

import asyncpg

from app.audit import record_audit
from app.billing.subscriptions import SubscriptionRecord, get_subscription, set_subscription_fields
from app.billing.updates import publish_subscription
from streams import EventPublisher

__all__ = ["set_status"]


async def set_status(
    pool: asyncpg.Pool,
    publisher: EventPublisher,
    subscription_id: str,
    status: str,
    *,
    only_from: frozenset[str],
    reason: str,
) -> SubscriptionRecord | None:
    """Moves to `status` when the subscription is in one of `only_from`."""
    async with pool.acquire() as conn, conn.transaction():
        before = await get_subscription(conn, subscription_id, for_update=True)
        if before is None or before.status not in only_from:
            return before
        after = await set_subscription_fields(conn, subscription_id, status=status)
        await record_audit(
            conn,
            f"subscription.{status}",
            user_id=after.user_id,
            subject_id=after.id,
            detail={"from": before.status, "reason": reason},
        )
    await publish_subscription(publisher, after, before)
    return after
