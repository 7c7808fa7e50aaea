"""What billing does when provisioning ends: activate, or fail, stop charging and refund.

A failed provisioning cancels the Stripe subscription immediately (not at period end) and
refunds the payment of its first invoice, each under one idempotency key however often it is
retried (a retry after a lost answer is a replay in Stripe: one cancellation, one refund).
Both are recorded first, in the same transaction that marks the subscription failed, so a call
that fails, or a process that dies before trying, is retried by the sweep and visible in the
audit log meanwhile.
Every instance sweeps, and the failing instance also tries at once: each row is claimed
(`FOR UPDATE SKIP LOCKED` plus a lock time, as the webhook inbox claims events), so one call is
in flight per compensation and its outcome is audited once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import anyio
import asyncpg

from app.audit import record_audit
from app.billing.errors import OUTAGES
from app.billing.provider import (
    SUBSCRIPTION_ID_KEY,
    PaymentProvider,
    PaymentProviderError,
    RefundInfo,
)
from app.billing.status import set_status
from app.billing.subscriptions import (
    SubscriptionRecord,
    get_subscription,
    queue_failed_provisioning_compensations,
    set_subscription_fields,
)
from app.billing.updates import publish_subscription
from app.db import Connection
from provisioning import OperationRecord
from provisioning.leases import INSTANCE_LOCK_CLASS, instance_gone
from streams import EventPublisher

__all__ = [
    "ACTIONS",
    "BillingHooks",
    "Compensation",
    "Recorded",
    "StripeAction",
    "cancellation_key",
    "refund_key",
]

logger = logging.getLogger(__name__)

SWEEP_SECONDS = 10.0
MAX_BACKOFF_SECONDS = 600
# A claim outlives the longest call the Stripe SDK makes (30 s timeout, 2 network retries with
# backoff: under 100 s), so that no other instance calls Stripe while one is still waiting for
# its answer. A killed process's claims are taken up at once all the same: its instance lock
# (provisioning.leases) is gone with its connection.
LOCK_SECONDS = 180
# One sweep performs at most this many, so that a backlog cannot hold a sweep for ever.
SWEEP_LIMIT = 100

# One at a time: the claim covers just the call in flight, and instances share a backlog.
# $1 one subscription or NULL, $2 LOCK_SECONDS, $3 this instance, $4 INSTANCE_LOCK_CLASS.
_CLAIM = f"""
UPDATE stripe_compensations c SET attempts = c.attempts + 1,
       locked_until = now() + make_interval(secs => $2), locked_by = $3
  FROM (SELECT subscription_id, action FROM stripe_compensations
         WHERE done_at IS NULL AND next_attempt_at <= now()
           AND (locked_until IS NULL OR locked_until < now()
                OR {instance_gone("locked_by", 4)})
           AND ($1::text IS NULL OR subscription_id = $1)
         ORDER BY next_attempt_at
         LIMIT 1
         FOR UPDATE SKIP LOCKED) due
 WHERE c.subscription_id = due.subscription_id AND c.action = due.action
RETURNING c.subscription_id, c.action, c.target_id, c.attempts
"""


def cancellation_key(subscription_id: str) -> str:
    return f"lookout-cancel-failed-provisioning-{subscription_id}"


def refund_key(subscription_id: str) -> str:
    return f"lookout-refund-failed-provisioning-{subscription_id}"


@dataclass(frozen=True, slots=True)
class Compensation:
    """A claimed row of `stripe_compensations`: `attempts` counts this one."""

    subscription_id: str
    action: str
    target_id: str
    attempts: int


@dataclass(frozen=True, slots=True)
class Recorded:
    """What an action's outcome changed, written in the transaction that marks it done: more
    audit detail, and the subscription before and after (published once committed)."""

    detail: Mapping[str, Any]
    change: tuple[SubscriptionRecord, SubscriptionRecord] | None = None
    kind: str | None = None  # the audit kind, when not the action's `done_audit`


@dataclass(frozen=True, slots=True, kw_only=True)
class StripeAction:
    """One kind of compensation: the call that performs it (under an idempotency key of its
    own, so a repeat has one effect) and how its outcome is audited."""

    perform: Callable[[PaymentProvider, Compensation], Awaitable[object]]
    doing: str  # for the log: "cancelling a Stripe subscription"
    done_audit: str
    failed_audit: str
    target_name: str  # what the audit detail calls `target_id`
    reason: str
    # Records the outcome (the answer of `perform`) where the customer sees it.
    record: Callable[[Connection, Compensation, object], Awaitable[Recorded]] | None = None


async def _cancel_now(provider: PaymentProvider, claimed: Compensation) -> object:
    return await provider.cancel_subscription_now(
        claimed.target_id, idempotency_key=cancellation_key(claimed.subscription_id)
    )


async def _refund(provider: PaymentProvider, claimed: Compensation) -> RefundInfo | None:
    return await provider.refund_first_payment(
        claimed.target_id,
        idempotency_key=refund_key(claimed.subscription_id),
        # Names the subscription, so that the refund's own events find it.
        metadata={SUBSCRIPTION_ID_KEY: claimed.subscription_id},
    )


async def _record_refund(conn: Connection, claimed: Compensation, outcome: object) -> Recorded:
    if not isinstance(outcome, RefundInfo):
        # A Checkout whose delayed payment failed: no money to give back.
        return Recorded({"refund": None}, kind="stripe.refund_not_needed")
    before = await get_subscription(conn, claimed.subscription_id, for_update=True)
    detail = {
        "refund_id": outcome.id,
        "payment_intent": outcome.payment_intent_id,
        "amount": outcome.amount,
        "currency": outcome.currency,
        "status": outcome.status,
    }
    if before is None or before.refund_amount is not None:
        # The refund's own webhook told its (fresher) state already.
        return Recorded(detail)
    after = await set_subscription_fields(
        conn,
        before.id,
        refund_amount=outcome.amount,
        refund_currency=outcome.currency,
        refund_status=outcome.status,
    )
    return Recorded(detail, (before, after))


# `queue_compensation(conn, subscription_id, <key>, target_id)` asks for one of these.
ACTIONS: Mapping[str, StripeAction] = MappingProxyType(
    {
        "cancel": StripeAction(
            perform=_cancel_now,
            doing="cancelling a Stripe subscription",
            done_audit="stripe.canceled",
            failed_audit="stripe.cancel_failed",
            target_name="stripe_subscription_id",
            reason="provisioning failed",
        ),
        "refund": StripeAction(
            perform=_refund,
            doing="refunding the first payment of a Stripe subscription",
            done_audit="stripe.refunded",
            failed_audit="stripe.refund_failed",
            target_name="stripe_subscription_id",
            reason="provisioning failed",
            record=_record_refund,
        ),
    }
)


class BillingHooks:
    """`provisioning.SubscriptionHooks`, as billing implements it.

    ``instance_id`` names this instance in its claims of compensations; its instance lock
    (`provisioning.leases.InstanceLock`, held by its runner) tells the others that those
    claims are alive."""

    # Provisioning appends it to the customer's message: `provisioning_failed` cancels.
    provision_failed_note = "Your subscription has been cancelled."

    def __init__(
        self,
        pool: asyncpg.Pool,
        provider: PaymentProvider,
        publisher: EventPublisher,
        *,
        instance_id: str,
    ) -> None:
        self._pool = pool
        self._provider = provider
        self._publisher = publisher
        self._instance_id = instance_id

    async def provisioning_succeeded(self, operation: OperationRecord) -> None:
        await set_status(
            self._pool,
            self._publisher,
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
                await queue_failed_provisioning_compensations(
                    conn, after.id, after.stripe_subscription_id
                )
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
        """Performs the compensations that are due (or those of `subscription_id`), each
        claimed first so that no other instance performs it at the same time; answers how
        many were tried."""
        tried = 0
        while tried < SWEEP_LIMIT:
            async with self._pool.acquire() as conn:
                row = await conn.fetchrow(
                    _CLAIM,
                    subscription_id,
                    float(LOCK_SECONDS),
                    self._instance_id,
                    INSTANCE_LOCK_CLASS,
                )
            if row is None:
                break
            tried += 1
            await self._perform(Compensation(**dict(row.items())))
        return tried

    async def _perform(self, claimed: Compensation) -> None:
        action = ACTIONS[claimed.action]
        try:
            outcome = await action.perform(self._provider, claimed)
        except PaymentProviderError as exc:
            backoff = min(2**claimed.attempts, MAX_BACKOFF_SECONDS)
            logger.warning(
                "%s (%s) failed (%s); retrying in %ds",
                action.doing,
                claimed.target_id,
                exc,
                backoff,
            )
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "UPDATE stripe_compensations SET last_error = $3, locked_until = NULL,"
                    " locked_by = NULL,"
                    " next_attempt_at = now() + make_interval(secs => $4)"
                    " WHERE subscription_id = $1 AND action = $2 AND done_at IS NULL",
                    claimed.subscription_id,
                    claimed.action,
                    str(exc)[:2000],
                    float(backoff),
                )
                await record_audit(
                    conn,
                    action.failed_audit,
                    subject_id=claimed.subscription_id,
                    detail={action.target_name: claimed.target_id, "error": str(exc)[:500]},
                )
            return
        recorded = None
        async with self._pool.acquire() as conn, conn.transaction():
            # Only the first to record it audits it: a call repeated after its claim expired
            # (a process that died after Stripe agreed) must not add a second row.
            first = await conn.fetchval(
                "UPDATE stripe_compensations SET done_at = now(), locked_until = NULL,"
                " locked_by = NULL, last_error = NULL WHERE subscription_id = $1 AND action = $2"
                " AND done_at IS NULL RETURNING true",
                claimed.subscription_id,
                claimed.action,
            )
            if first:
                if action.record is not None:
                    recorded = await action.record(conn, claimed, outcome)
                await record_audit(
                    conn,
                    (recorded.kind if recorded else None) or action.done_audit,
                    user_id=recorded.change[1].user_id if recorded and recorded.change else None,
                    subject_id=claimed.subscription_id,
                    detail={
                        action.target_name: claimed.target_id,
                        "reason": action.reason,
                        **(recorded.detail if recorded else {}),
                    },
                )
        if recorded is not None and recorded.change is not None:
            after, before = recorded.change[1], recorded.change[0]
            await publish_subscription(self._publisher, after, before)

    async def run_sweeps(self) -> None:
        """Retries failed compensations until cancelled."""
        while True:
            try:
                await self.cancel_due()
            except OUTAGES as exc:
                logger.warning("the Stripe cancellation sweep failed (%r); retrying", exc)
            await anyio.sleep(SWEEP_SECONDS)
