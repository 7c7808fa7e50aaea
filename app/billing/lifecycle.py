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
from datetime import datetime, timedelta

import asyncpg

from app.audit import record_audit
from app.billing.access import DEFAULT_GRACE, converge_access
from app.billing.fulfilment import Fulfilment, PaymentConfirmation, fulfil_many, resource_spec
from app.billing.plans import PLANS, plan_by_lookup_key
from app.billing.provider import RefundInfo, SubscriptionInfo
from app.billing.status import set_status
from app.billing.subscriptions import (
    ACTIVE_RESOURCE_STATUSES,
    TERMINAL_STATUSES,
    SubscriptionRecord,
    get_subscription,
    queue_failed_provisioning_compensations,
    set_subscription_fields,
)
from app.billing.updates import publish_subscription, subscription_updates
from app.db import Connection
from provisioning import (
    NothingToDeprovision,
    OperationRecord,
    OperationRunner,
    resource_for_subject,
)
from streams import EventPublisher

__all__ = ["Lifecycle", "StripeState", "status_for_stripe"]

logger = logging.getLogger(__name__)

# Resource statuses in which a resource exists for its customer (a suspended one too).
_PRESENT = ("active", "suspended")


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
    cancel_at_period_end: bool  # a cancellation is scheduled, by either of Stripe's fields
    current_period_end: datetime | None
    observed_at: datetime
    cancel_at: datetime | None = None
    # The plan whose price the subscription's item has (None: not known from this view). A
    # plan changed in Stripe (the API, the Customer Portal) is followed from here.
    plan: str | None = None

    @classmethod
    def fetched(cls, info: SubscriptionInfo, observed_at: datetime) -> StripeState:
        priced = plan_by_lookup_key(info.price_lookup_key)
        return cls(
            stripe_id=info.id,
            status=info.status,
            customer_id=info.customer_id,
            cancel_at_period_end=info.cancel_at_period_end or info.cancel_at is not None,
            current_period_end=info.current_period_end,
            observed_at=observed_at,
            cancel_at=info.cancel_at
            or (info.current_period_end if info.cancel_at_period_end else None),
            plan=priced.name if priced else None,
        )


class Lifecycle:
    def __init__(
        self,
        pool: asyncpg.Pool,
        publisher: EventPublisher,
        runner: OperationRunner,
        *,
        past_due_grace: timedelta = DEFAULT_GRACE,
    ) -> None:
        self._pool = pool
        self._publisher = publisher
        self.runner = runner
        # How long `past_due` keeps its resource (LOOKOUT_PAST_DUE_GRACE_DAYS).
        self.past_due_grace = past_due_grace

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
        return await fulfil_many(conn, self.runner, confirmations)

    async def announce(self, fulfilment: Fulfilment) -> None:
        """After `fulfil_many` committed: every `operation.started` and `subscription.updated`
        in one round trip to Redis, and the operations running."""
        await self.runner.launch(
            fulfilment.operations, along=subscription_updates(fulfilment.changes)
        )

    async def _start_provisioning(self, record: SubscriptionRecord) -> SubscriptionRecord:
        operation = await self.runner.start(
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
        return await set_status(
            self._pool, self._publisher, subscription_id, status, only_from=only_from, reason=reason
        )

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
                cancel_at=state.cancel_at,
                current_period_end=state.current_period_end or before.current_period_end,
                stripe_state_at=state.observed_at,
            )
            stripe_still_charges = state.status not in ("canceled", "incomplete_expired")
            if status == "failed" and stripe_still_charges and after.stripe_subscription_id:
                # Provisioning failed before Stripe's subscription was known: stop charging now,
                # and give back what was paid.
                await queue_failed_provisioning_compensations(
                    conn, subscription_id, after.stripe_subscription_id
                )
            if status != before.status:
                await record_audit(
                    conn,
                    f"subscription.{status}",
                    user_id=after.user_id,
                    subject_id=after.id,
                    detail={"from": before.status, "stripe_status": state.status, "source": source},
                )
            after, resize = await self._follow_plan(conn, after, state.plan, source=source)
            after, access = await self._converge_access(conn, after, reason=source)
        await publish_subscription(self._publisher, after, before)
        changes = [op for op in (resize, access) if op is not None]
        if changes:
            await self.runner.launch(changes)
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

    async def refund_changed(
        self, subscription_id: str, refund: RefundInfo, *, source: str
    ) -> SubscriptionRecord | None:
        """Stripe's current state of the refund of a failed provisioning (it may fail or be
        cancelled after it was made): what the customer is shown."""
        async with self._pool.acquire() as conn, conn.transaction():
            before = await get_subscription(conn, subscription_id, for_update=True)
            if before is None:
                return None
            after = await set_subscription_fields(
                conn,
                subscription_id,
                refund_amount=refund.amount,
                refund_currency=refund.currency,
                refund_status=refund.status,
            )
            if (before.refund_amount, before.refund_status) != (refund.amount, refund.status):
                await record_audit(
                    conn,
                    "subscription.refund_changed",
                    user_id=after.user_id,
                    subject_id=after.id,
                    detail={"refund_id": refund.id, "status": refund.status, "source": source},
                )
        await publish_subscription(self._publisher, after, before)
        return after

    # -- access follows payment (issue 13; the rules are `app.billing.access`) --------------
    async def _converge_access(
        self,
        conn: Connection,
        record: SubscriptionRecord,
        *,
        reason: str,
        grace: timedelta | None = None,
    ) -> tuple[SubscriptionRecord, OperationRecord | None]:
        """In the caller's transaction (row locked): the suspend or resume the status now
        requires, made the subscription's operation; launched by the caller after commit."""
        op = await converge_access(
            conn,
            self.runner,
            record,
            grace=self.past_due_grace if grace is None else grace,
            reason=reason,
        )
        if op is None:
            return record, None
        return await set_subscription_fields(conn, record.id, operation_id=op.id), op

    async def converge_access(
        self, subscription_id: str, *, grace: timedelta | None = None, reason: str
    ) -> OperationRecord | None:
        """Decides again what the subscription's access must be, and starts what it needs
        (the access sweep's entry: a grace that ended, a decision a crash interrupted)."""
        async with self._pool.acquire() as conn, conn.transaction():
            before = await get_subscription(conn, subscription_id, for_update=True)
            if before is None:
                return None
            after, op = await self._converge_access(conn, before, reason=reason, grace=grace)
        await publish_subscription(self._publisher, after, before)
        if op is not None:
            await self.runner.launch([op])
        return op

    async def _follow_plan(
        self, conn: Connection, record: SubscriptionRecord, plan_name: str | None, *, source: str
    ) -> tuple[SubscriptionRecord, OperationRecord | None]:
        """In the caller's transaction (row locked, Stripe's view newer than the last one):
        the subscription takes the plan Stripe's price names, and its resource follows with a
        `resize` (the subscription's operation from now on), created here so that it runs
        after every change decided before. A price of another resource type is not followed
        (a graph cannot become a repository): it is logged for an operator."""
        if plan_name is None or plan_name == record.plan:
            return record, None
        plan = PLANS.get(plan_name)
        if plan is None or plan.resource_type != record.resource_type:
            logger.error(
                "subscription %s (%s) is priced as %s in Stripe; not followed",
                record.id,
                record.resource_type,
                plan_name,
            )
            return record, None
        if record.status not in ACTIVE_RESOURCE_STATUSES:
            return record, None  # not provisioned yet, or ended: nothing to resize
        after = await set_subscription_fields(conn, record.id, plan=plan.name)
        resource = await resource_for_subject(conn, record.id)
        op: OperationRecord | None = None
        if resource is not None and resource.status in _PRESENT:
            op = await self.runner.create_change(
                conn,
                "resize",
                after.id,
                after.user_id,
                resource_spec(after),
                resource_id=resource.id,
            )
            after = await set_subscription_fields(conn, record.id, operation_id=op.id)
        await record_audit(
            conn,
            "subscription.plan_changed",
            user_id=after.user_id,
            subject_id=after.id,
            detail={
                "from": record.plan,
                "to": plan.name,
                "operation_id": op.id if op else None,
                "source": source,
            },
        )
        return after, op

    async def schedule_deprovisioning(self, record: SubscriptionRecord) -> None:
        try:
            await self.runner.start("deprovision", record.id, record.user_id, resource_spec(record))
        except NothingToDeprovision:
            logger.info("subscription %s ended before anything was provisioned", record.id)
