"""The subscriptions table: records, queries and their API shape."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from app.db import Connection

__all__ = [
    "ACTIVE_RESOURCE_STATUSES",
    "TERMINAL_STATUSES",
    "Payment",
    "SubscriptionRecord",
    "count_billing_change",
    "delete_unpaid_subscription",
    "get_subscription",
    "get_subscription_by_resource",
    "get_subscription_by_session",
    "get_subscription_by_stripe_id",
    "insert_subscription",
    "list_subscriptions",
    "lock_for_payment",
    "mark_paid",
    "mark_payment_method",
    "queue_compensation",
    "queue_failed_provisioning_compensations",
    "queue_stripe_cancellation",
    "set_subscription_fields",
    "track_past_due",
]

# Once here, a subscription stays: no later event moves it anywhere else.
TERMINAL_STATUSES = frozenset({"canceled", "failed", "expired"})
# The resource exists and belongs to the customer in these.
ACTIVE_RESOURCE_STATUSES = frozenset({"active", "past_due", "unpaid", "paused"})

_COLUMNS = (
    "id, user_id, plan, resource_type, resource_name, resource_id, status,"
    " stripe_checkout_session_id, stripe_subscription_id, stripe_customer_id,"
    " cancel_at_period_end, current_period_end, has_payment_method, stripe_state_at,"
    " billing_changes, operation_id, created_at, updated_at, cancel_at,"
    " refund_amount, refund_currency, refund_status"
)


@dataclass(frozen=True, slots=True)
class SubscriptionRecord:
    id: str
    user_id: str
    plan: str
    resource_type: str
    resource_name: str
    resource_id: str
    status: str
    stripe_checkout_session_id: str | None
    stripe_subscription_id: str | None
    stripe_customer_id: str | None
    cancel_at_period_end: bool
    current_period_end: datetime | None
    has_payment_method: bool
    stripe_state_at: datetime | None
    billing_changes: int
    operation_id: str | None
    created_at: datetime
    updated_at: datetime
    # When Stripe ends it (`cancel_at_period_end` is then true too); None: not scheduled.
    cancel_at: datetime | None = None
    # What was given back when provisioning failed; None when nothing was.
    refund_amount: int | None = None
    refund_currency: str | None = None
    refund_status: str | None = None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> SubscriptionRecord:
        return cls(**dict(row.items()))


def _one(row: asyncpg.Record | None) -> SubscriptionRecord | None:
    return SubscriptionRecord.from_row(row) if row is not None else None


async def insert_subscription(
    conn: Connection,
    *,
    subscription_id: str,
    user_id: str,
    plan: str,
    resource_type: str,
    resource_name: str,
    resource_id: str,
) -> SubscriptionRecord:
    row = await conn.fetchrow(
        "INSERT INTO subscriptions (id, user_id, plan, resource_type, resource_name,"
        " resource_id, status) VALUES ($1, $2, $3, $4, $5, $6, 'pending_payment')"
        f" RETURNING {_COLUMNS}",
        subscription_id,
        user_id,
        plan,
        resource_type,
        resource_name,
        resource_id,
    )
    assert row is not None
    return SubscriptionRecord.from_row(row)


async def _one_by(
    conn: Connection, column: str, value: str, *, lock: str = ""
) -> SubscriptionRecord | None:
    # `column` and `lock` come from this module, never from a request.
    return _one(
        await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM subscriptions WHERE {column} = $1{lock}", value
        )
    )


async def get_subscription(
    conn: Connection,
    subscription_id: str,
    *,
    for_update: bool = False,
    skip_locked: bool = False,
) -> SubscriptionRecord | None:
    """`skip_locked` (with `for_update`): None also when another transaction holds it."""
    lock = " FOR UPDATE SKIP LOCKED" if skip_locked else " FOR UPDATE"
    return await _one_by(conn, "id", subscription_id, lock=lock if for_update else "")


async def get_subscription_by_session(
    conn: Connection, session_id: str
) -> SubscriptionRecord | None:
    return await _one_by(conn, "stripe_checkout_session_id", session_id)


async def get_subscription_by_stripe_id(
    conn: Connection, stripe_subscription_id: str
) -> SubscriptionRecord | None:
    return await _one_by(conn, "stripe_subscription_id", stripe_subscription_id)


async def get_subscription_by_resource(
    conn: Connection, resource_id: str
) -> SubscriptionRecord | None:
    return await _one_by(conn, "resource_id", resource_id)


async def list_subscriptions(
    conn: Connection, user_id: str, *, status: str | None = None, resource_name: str | None = None
) -> list[SubscriptionRecord]:
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM subscriptions WHERE user_id = $1"
        " AND ($2::text IS NULL OR status = $2) AND ($3::text IS NULL OR resource_name = $3)"
        " ORDER BY created_at DESC, id",
        user_id,
        status,
        resource_name,
    )
    return [SubscriptionRecord.from_row(r) for r in rows]


_SETTABLE = frozenset(
    {
        "status",
        "plan",  # a plan change (same resource type), with its `resize` operation
        "stripe_checkout_session_id",
        "stripe_subscription_id",
        "stripe_customer_id",
        "cancel_at_period_end",
        "cancel_at",
        "current_period_end",
        "has_payment_method",
        "stripe_state_at",
        "billing_changes",
        "operation_id",
        "refund_amount",
        "refund_currency",
        "refund_status",
    }
)


async def set_subscription_fields(
    conn: Connection, subscription_id: str, **fields: Any
) -> SubscriptionRecord:
    """Writes the given columns; the names come from code, never from a request."""
    unknown = set(fields) - _SETTABLE
    if unknown:
        raise ValueError(f"not settable: {sorted(unknown)}")
    names = sorted(fields)
    assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(names, start=2))
    # clock_timestamp(), not now() (the transaction's start): a transaction that waited for
    # the row's lock stamps a later time than the one it waited for, so `updated_at` orders a
    # subscription's versions, and clients drop a `subscription.updated` published late.
    row = await conn.fetchrow(
        f"UPDATE subscriptions SET {assignments}, updated_at = clock_timestamp() WHERE id = $1"
        f" RETURNING {_COLUMNS}",
        subscription_id,
        *(fields[n] for n in names),
    )
    if row is None:
        raise LookupError(f"no subscription {subscription_id}")
    return SubscriptionRecord.from_row(row)


async def queue_stripe_cancellation(
    conn: Connection, subscription_id: str, stripe_subscription_id: str
) -> None:
    """Records that Stripe must stop charging for this subscription at once; the
    compensation sweep keeps trying until Stripe agrees."""
    await queue_compensation(conn, subscription_id, "cancel", stripe_subscription_id)


async def queue_failed_provisioning_compensations(
    conn: Connection, subscription_id: str, stripe_subscription_id: str
) -> None:
    """A failed provisioning owes the customer both: no further charge (the subscription is
    cancelled at once) and their money back (the first invoice's payment is refunded)."""
    await queue_stripe_cancellation(conn, subscription_id, stripe_subscription_id)
    await queue_compensation(conn, subscription_id, "refund", stripe_subscription_id)


async def queue_compensation(
    conn: Connection, subscription_id: str, action: str, target_id: str
) -> None:
    """Records a Stripe `action` (see `app.billing.compensation`) owed for this subscription,
    once: queueing it again changes nothing."""
    await conn.execute(
        "INSERT INTO stripe_compensations (subscription_id, action, target_id)"
        " VALUES ($1, $2, $3) ON CONFLICT (subscription_id, action) DO NOTHING",
        subscription_id,
        action,
        target_id,
    )


async def lock_for_payment(
    conn: Connection, subscription_ids: Sequence[str], checkout_session_ids: Sequence[str]
) -> list[SubscriptionRecord]:
    """The subscriptions with these ids or Checkout Sessions, locked for update in id order
    (so that two instances locking overlapping sets cannot deadlock)."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM subscriptions"
        " WHERE id = ANY($1::text[]) OR stripe_checkout_session_id = ANY($2::text[])"
        " ORDER BY id FOR UPDATE",
        list(subscription_ids),
        list(checkout_session_ids),
    )
    return [SubscriptionRecord.from_row(r) for r in rows]


@dataclass(frozen=True, slots=True)
class Payment:
    subscription_id: str
    stripe_subscription_id: str | None
    stripe_customer_id: str | None
    operation_id: str


async def mark_paid(conn: Connection, payments: Sequence[Payment]) -> list[SubscriptionRecord]:
    """`pending_payment` → `provisioning` with its operation, in one statement; Stripe ids
    already known are kept."""
    rows = await conn.fetch(
        "UPDATE subscriptions SET status = 'provisioning',"
        " stripe_subscription_id = coalesce(stripe_subscription_id, p.paid_stripe_id),"
        " stripe_customer_id = coalesce(stripe_customer_id, p.paid_customer_id),"
        " operation_id = p.paid_operation_id, updated_at = clock_timestamp()"
        " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])"
        " AS p(paid_id, paid_stripe_id, paid_customer_id, paid_operation_id)"
        f" WHERE id = p.paid_id AND status = 'pending_payment' RETURNING {_COLUMNS}",
        [p.subscription_id for p in payments],
        [p.stripe_subscription_id for p in payments],
        [p.stripe_customer_id for p in payments],
        [p.operation_id for p in payments],
    )
    return [SubscriptionRecord.from_row(r) for r in rows]


# -- past due since (issue 13: access follows payment) ------------------------------------
async def track_past_due(conn: Connection, subscription_id: str) -> datetime | None:
    """Keeps `past_due_since` with the status: set when it turns `past_due` (kept while it
    stays so), cleared when it leaves it. Answers it, for the grace-period rule."""
    since: datetime | None = await conn.fetchval(
        "UPDATE subscriptions SET past_due_since = CASE WHEN status = 'past_due'"
        " THEN coalesce(past_due_since, now()) END WHERE id = $1 RETURNING past_due_since",
        subscription_id,
    )
    return since


async def count_billing_change(conn: Connection, subscription_id: str) -> int:
    """Counts a change asked of Stripe (cancel, reactivate, a plan change) before it is sent:
    the answer orders it against the state Stripe reports later."""
    changes: int = await conn.fetchval(
        "UPDATE subscriptions SET billing_changes = billing_changes + 1 WHERE id = $1"
        " RETURNING billing_changes",
        subscription_id,
    )
    return changes


async def delete_unpaid_subscription(conn: Connection, subscription_id: str) -> None:
    """Forgets a subscription whose Checkout Session could not be created: nothing was paid."""
    await conn.execute("DELETE FROM subscriptions WHERE id = $1", subscription_id)


async def mark_payment_method(conn: Connection, customer_id: str | None) -> list[asyncpg.Record]:
    """Every subscription of the Stripe customer now has a payment method on file; answers
    their `id` and `user_id`."""
    return await conn.fetch(
        "UPDATE subscriptions SET has_payment_method = true, updated_at = now()"
        " WHERE stripe_customer_id = $1 RETURNING id, user_id",
        customer_id,
    )
