"""Fulfilling a burst of payments at once: what `Lifecycle.fulfil` does for one, done for a
whole group of confirmations in a few set-based statements (one lock, one INSERT of
operations, one UPDATE, one INSERT of audit rows), inside the caller's transaction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app.audit import AuditEntry, record_audits
from app.billing.plans import get_plan
from app.billing.subscriptions import Payment, SubscriptionRecord, lock_for_payment, mark_paid
from app.db import Connection
from provisioning import OperationRecord, OperationRunner, ProvisionRequest, ResourceSpec

__all__ = ["Fulfilment", "PaymentConfirmation", "fulfil_many", "resource_spec"]


def resource_spec(record: SubscriptionRecord) -> ResourceSpec:
    plan = get_plan(record.plan)
    limits = {"max_resources": plan.limits.max_per_user}
    if plan.limits.max_connections is not None:
        limits["max_connections"] = plan.limits.max_connections
    return ResourceSpec(resource_type=plan.resource_type, plan_name=plan.name, limits=limits)


@dataclass(frozen=True, slots=True, kw_only=True)
class PaymentConfirmation:
    """A Stripe event saying a Checkout Session is paid, as `fulfil_many` takes it."""

    event_id: str
    event_type: str
    subscription_id: str | None
    checkout_session_id: str | None
    stripe_subscription_id: str | None
    customer_id: str | None


@dataclass(frozen=True, slots=True)
class Fulfilment:
    """What `fulfil_many` committed: the events it handled, the operations it created and the
    subscriptions it changed, as `(after, before)`."""

    event_ids: frozenset[str]
    operations: tuple[OperationRecord, ...]
    changes: tuple[tuple[SubscriptionRecord, SubscriptionRecord], ...]


async def fulfil_many(
    conn: Connection, runner: OperationRunner, confirmations: Sequence[PaymentConfirmation]
) -> Fulfilment:
    """`Lifecycle.fulfil` for a burst of payments, in the caller's transaction, in a few
    statements for all of them; `Lifecycle.announce` starts them once it has committed. The
    confirmations it leaves (a repeat, a subscription already past `pending_payment` or
    unknown here) are for `Lifecycle.fulfil`."""
    found = await lock_for_payment(
        conn,
        [c.subscription_id for c in confirmations if c.subscription_id],
        [c.checkout_session_id for c in confirmations if c.checkout_session_id],
    )
    by_id = {r.id: r for r in found}
    by_session = {r.stripe_checkout_session_id: r for r in found if r.stripe_checkout_session_id}
    paid: dict[str, tuple[PaymentConfirmation, SubscriptionRecord]] = {}
    for confirmation in confirmations:
        record = by_id.get(confirmation.subscription_id or "") or by_session.get(
            confirmation.checkout_session_id or ""
        )
        if record and record.status == "pending_payment" and not record.operation_id:
            paid.setdefault(record.id, (confirmation, record))
    created = await runner.create_provisions(
        conn,
        [
            ProvisionRequest(r.id, r.user_id, resource_spec(r), r.resource_id)
            for _, r in paid.values()
        ],
    )
    payments = []
    for op in created:
        confirmation = paid[op.subject_id][0]
        payments.append(
            Payment(
                op.subject_id, confirmation.stripe_subscription_id, confirmation.customer_id, op.id
            )
        )
    afters = await mark_paid(conn, payments)
    started = {op.subject_id: op for op in created}
    await record_audits(
        conn,
        [
            entry
            for a in afters
            for entry in (
                *_paid_entries(*paid[a.id]),
                AuditEntry("operation.started", a.user_id, a.id, started[a.id].audit_detail()),
            )
        ],
    )
    return Fulfilment(
        event_ids=frozenset(paid[a.id][0].event_id for a in afters),
        operations=tuple(created),
        changes=tuple((a, paid[a.id][1]) for a in afters),
    )


def _paid_entries(
    confirmation: PaymentConfirmation, record: SubscriptionRecord
) -> tuple[AuditEntry, AuditEntry]:
    """What `StripeEventHandlers` and `fulfil` audit, one event at a time."""
    return (
        AuditEntry(
            f"stripe.{confirmation.event_type}",
            record.user_id,
            record.id,
            {"event_id": confirmation.event_id, "object_id": confirmation.checkout_session_id},
        ),
        AuditEntry(
            "subscription.paid",
            record.user_id,
            record.id,
            {
                "source": confirmation.event_type,
                "stripe_subscription_id": confirmation.stripe_subscription_id,
            },
        ),
    )
