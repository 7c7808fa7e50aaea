"""The subscription lifecycle: paying starts provisioning; Stripe's state moves the status.

Every change goes through here, whether it comes from a webhook, from the checkout return
page asking Stripe itself, or from the customer's own cancel button, so that each rule is
written once: terminal statuses stay; paying can only move a subscription forward; an
older view of Stripe never overwrites a newer one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from app.audit import record_audit
from app.billing.fulfilment import Fulfilment, PaymentConfirmation, fulfil_many, resource_spec
from app.billing.provider import SubscriptionInfo
from app.billing.subscriptions import (
    ACTIVE_RESOURCE_STATUSES,
    TERMINAL_STATUSES,
    SubscriptionRecord,
    get_subscription,
    queue_stripe_cancellation,
    set_subscription_fields,
)
from app.billing.updates import publish_subscription, subscription_updates
from app.db import Connection
from provisioning import NothingToDeprovision, OperationRunner
from streams import EventPublisher

__all__ = ["Lifecycle", "StripeState", "status_for_stripe"]

logger = logging.getLogger(__name__)


def status_for_stripe(stripe_status: str, current: str) -> str:
    """Our status once Stripe's subscription is in `stripe_status`."""
    if current in TERMINAL_STATUSES:
        return current
    if stripe_status == "canceled":
        return "canceled"
    if stripe_status == "incomplete_expired":
        # The first payment failed (a bank debit bounced, or it was never made): the same
        # end as `checkout.session.async_payment_failed`, whichever of the two comes first.
        return "failed" if current == "pending_payment" else current
    if current not in ACTIVE_RESOURCE_STATUSES:
        # Paid but not yet provisioned: provisioning, not Stripe, says when it is active.
        return current
    mapped = {
        "active": "active",
        "trialing": "active",
        "past_due": "past_due",
        "unpaid": "unpaid",
        "paused": "paused",
    }
    return mapped.get(stripe_status, current)


@dataclass(frozen=True, slots=True, kw_only=True)
class StripeState:
    """The part of a Stripe subscription Lookout keeps, with when it was true."""

    stripe_id: str
    status: str
    customer_id: str | None
    cancel_at_period_end: bool
    current_period_end: datetime | None
    observed_at: datetime

    @classmethod
    def fetched(cls, info: SubscriptionInfo, observed_at: datetime) -> StripeState:
        return cls(
            stripe_id=info.id,
            status=info.status,
            customer_id=info.customer_id,
            cancel_at_period_end=info.cancel_at_period_end or info.cancel_at is not None,
            current_period_end=info.current_period_end,
            observed_at=observed_at,
        )


class Lifecycle:
    def __init__(self, pool: asyncpg.Pool, publisher: EventPublisher) -> None:
        self._pool = pool
        self._publisher = publisher
        self.runner: OperationRunner | None = None  # attached once the runner exists

    async def fulfil(
        self,
        subscription_id: str,
        *,
        stripe_subscription_id: str | None,
        customer_id: str | None,
        source: str,
    ) -> SubscriptionRecord | None:
        """Payment is confirmed: `pending_payment` → `provisioning`, and provisioning starts.
        Safe to repeat: a subscription already past that point only gets its operation
        (re)attached, which is how a crash between the two steps heals."""
        async with self._pool.acquire() as conn, conn.transaction():
            before = await get_subscription(conn, subscription_id, for_update=True)
            if before is None:
                return None
            after = before
            if before.status == "pending_payment":
                fields: dict[str, object] = {"status": "provisioning"}
                if stripe_subscription_id and not before.stripe_subscription_id:
                    fields["stripe_subscription_id"] = stripe_subscription_id
                if customer_id and not before.stripe_customer_id:
                    fields["stripe_customer_id"] = customer_id
                after = await set_subscription_fields(conn, subscription_id, **fields)
                await record_audit(
                    conn,
                    "subscription.paid",
                    user_id=after.user_id,
                    subject_id=after.id,
                    detail={"source": source, "stripe_subscription_id": stripe_subscription_id},
                )
        await publish_subscription(self._publisher, after, before)
        if after.status == "provisioning" and after.operation_id is None:
            after = await self._start_provisioning(after)
        return after

    async def fulfil_many(
        self, conn: Connection, confirmations: Sequence[PaymentConfirmation]
    ) -> Fulfilment:
        """`fulfil` for a burst of payments, in the caller's transaction (see `fulfilment`);
        `announce` starts them once it has committed."""
        return await fulfil_many(conn, self._runner(), confirmations)

    async def announce(self, fulfilment: Fulfilment) -> None:
        """After `fulfil_many` committed: every `operation.started` and `subscription.updated`
        in one round trip to Redis, and the operations running."""
        await self._runner().launch(
            fulfilment.operations, along=subscription_updates(fulfilment.changes)
        )

    def _runner(self) -> OperationRunner:
        if self.runner is None:
            raise RuntimeError("the provisioning runner is not attached to the lifecycle")
        return self.runner

    async def _start_provisioning(self, record: SubscriptionRecord) -> SubscriptionRecord:
        operation = await self._runner().start(
            "provision",
            record.id,
            record.user_id,
            resource_spec(record),
            resource_id=record.resource_id,
        )
        async with self._pool.acquire() as conn:
            after = await set_subscription_fields(conn, record.id, operation_id=operation.id)
        await publish_subscription(self._publisher, after, record)
        return after

    async def set_status(
        self, subscription_id: str, status: str, *, only_from: frozenset[str], reason: str
    ) -> SubscriptionRecord | None:
        """Moves to `status` when the subscription is in one of `only_from`."""
        async with self._pool.acquire() as conn, conn.transaction():
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
        await publish_subscription(self._publisher, after, before)
        return after

    async def apply_stripe_state(
        self, subscription_id: str, state: StripeState, *, source: str
    ) -> SubscriptionRecord | None:
        """Applies Stripe's view unless a newer one was applied already."""
        async with self._pool.acquire() as conn, conn.transaction():
            before = await get_subscription(conn, subscription_id, for_update=True)
            if before is None:
                return None
            if before.stripe_state_at is not None and state.observed_at < before.stripe_state_at:
                logger.info("ignoring stale Stripe state of %s from %s", subscription_id, source)
                return before
            status = status_for_stripe(state.status, before.status)
            after = await set_subscription_fields(
                conn,
                subscription_id,
                status=status,
                stripe_subscription_id=before.stripe_subscription_id or state.stripe_id,
                stripe_customer_id=before.stripe_customer_id or state.customer_id,
                cancel_at_period_end=state.cancel_at_period_end,
                current_period_end=state.current_period_end or before.current_period_end,
                stripe_state_at=state.observed_at,
            )
            stripe_still_charges = state.status not in ("canceled", "incomplete_expired")
            if status == "failed" and stripe_still_charges and after.stripe_subscription_id:
                # Provisioning failed before Stripe's subscription was known: stop charging now.
                await queue_stripe_cancellation(conn, subscription_id, after.stripe_subscription_id)
            if status != before.status:
                await record_audit(
                    conn,
                    f"subscription.{status}",
                    user_id=after.user_id,
                    subject_id=after.id,
                    detail={"from": before.status, "stripe_status": state.status, "source": source},
                )
        await publish_subscription(self._publisher, after, before)
        if before.status == "pending_payment" and state.status in ("active", "trialing"):
            # Stripe says it is paid even though the checkout event has not been seen.
            return await self.fulfil(
                subscription_id,
                stripe_subscription_id=state.stripe_id,
                customer_id=state.customer_id,
                source=source,
            )
        if after.status == "canceled" and before.status != "canceled":
            await self.schedule_deprovisioning(after)
        return after

    async def schedule_deprovisioning(self, record: SubscriptionRecord) -> None:
        try:
            await self._runner().start(
                "deprovision", record.id, record.user_id, resource_spec(record)
            )
        except NothingToDeprovision:
            logger.info("subscription %s ended before anything was provisioned", record.id)
