"""Changing a subscription and telling its owner: every change is published as
`subscription.updated` on the user's topic, after the transaction that made it commits."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from redis.exceptions import RedisError

from app.billing.plans import PLANS
from app.billing.subscriptions import SubscriptionRecord
from streams import Event, EventPublisher, isoformat_z, user_topic

__all__ = ["publish_subscription", "subscription_json", "subscription_updates"]

logger = logging.getLogger(__name__)


def subscription_json(record: SubscriptionRecord) -> dict[str, Any]:
    """The object `GET /v1/subscriptions/{id}` answers, and `subscription.updated` carries."""
    plan = PLANS.get(record.plan)
    return {
        "id": record.id,
        "status": record.status,
        "plan": record.plan,
        "plan_display_name": plan.display_name if plan else record.plan,
        "resource_type": record.resource_type,
        "resource_id": record.resource_id,
        "resource_name": record.resource_name,
        "cancel_at_period_end": record.cancel_at_period_end,
        "cancel_at": isoformat_z(record.cancel_at) if record.cancel_at else None,
        "current_period_end": (
            isoformat_z(record.current_period_end) if record.current_period_end else None
        ),
        "operation_id": record.operation_id,
        "refund": refund_json(record),
        "created_at": isoformat_z(record.created_at),
        "updated_at": isoformat_z(record.updated_at),
    }


def refund_json(record: SubscriptionRecord) -> dict[str, Any] | None:
    """What a failed provisioning gave back: `{"amount", "currency", "status"}`, or None."""
    if record.refund_amount is None:
        return None
    return {
        "amount": record.refund_amount,
        "currency": record.refund_currency,
        "status": record.refund_status,
    }


def _changed(before: SubscriptionRecord | None, after: SubscriptionRecord) -> bool:
    if before is None:
        return True
    return subscription_json(before) | {"updated_at": None} != subscription_json(after) | {
        "updated_at": None
    }


async def publish_subscription(
    publisher: EventPublisher,
    after: SubscriptionRecord,
    before: SubscriptionRecord | None = None,
    *,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Publishes the subscription when it changed. A Redis outage loses the live event, not
    the change: the subscription is in PostgreSQL and the next snapshot shows it."""
    if not _changed(before, after):
        return
    try:
        await publisher.publish(_updated(after, extra), [user_topic(after.user_id)])
    except (RedisError, OSError):
        logger.exception("could not publish subscription.updated for %s", after.id)


def subscription_updates(
    changes: Sequence[tuple[SubscriptionRecord, SubscriptionRecord]],
) -> list[tuple[Event, list[str]]]:
    """The `subscription.updated` events of `(after, before)` changes, to publish together."""
    return [
        (_updated(after), [user_topic(after.user_id)])
        for after, before in changes
        if _changed(before, after)
    ]


def _updated(after: SubscriptionRecord, extra: Mapping[str, Any] | None = None) -> Event:
    return Event.create(
        "subscription.updated",
        subscription_id=after.id,
        subscription=subscription_json(after),
        **dict(extra or {}),
    )
