"""What each Stripe event does. Anything not handled here is logged and kept in the inbox.

Stripe delivers late, twice and out of order, and a payload is a picture of the object at the
time of the event: so where the current state matters, the object is fetched from Stripe and
that state applied, stamped with the time of the fetch. Only when Stripe does not know the
object is the payload used, stamped with the event's own `created`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any

import asyncpg

from app.audit import record_audit, record_event_audit
from app.billing.fulfilment import PaymentConfirmation
from app.billing.invoices import Invoices
from app.billing.lifecycle import Lifecycle, StripeState
from app.billing.provider import PaymentProvider, PaymentProviderNotFound
from app.billing.stripe.objects import (
    invoice_info,
    invoice_subscription_details,
    invoice_subscription_id,
    lookout_id,
    object_id,
    period_end,
    timestamp,
)
from app.billing.subscriptions import (
    SubscriptionRecord,
    get_subscription,
    get_subscription_by_session,
    get_subscription_by_stripe_id,
    mark_payment_method,
)
from app.billing.webhooks.inbox import Batch, InboxEvent
from app.db import Connection

__all__ = ["StripeEventHandlers"]

logger = logging.getLogger(__name__)

PAID = frozenset({"paid", "no_payment_required"})


class StripeEventHandlers:
    def __init__(
        self,
        pool: asyncpg.Pool,
        provider: PaymentProvider,
        lifecycle: Lifecycle,
        *,
        invoices: Invoices | None = None,
    ) -> None:
        """`invoices`, when given, hears of every `invoice.*` event about a subscription."""
        self._pool = pool
        self._provider = provider
        self._lifecycle = lifecycle
        self._invoices = invoices
        self._handlers: dict[str, Callable[[InboxEvent, SubscriptionRecord], Awaitable[None]]] = {
            "checkout.session.completed": self._checkout_completed,
            "checkout.session.async_payment_succeeded": self._checkout_paid,
            "checkout.session.async_payment_failed": self._checkout_payment_failed,
            "checkout.session.expired": self._checkout_expired,
            "customer.subscription.created": self._subscription_changed,
            "customer.subscription.updated": self._subscription_changed,
            "customer.subscription.deleted": self._subscription_changed,
            "customer.subscription.paused": self._subscription_changed,
            "customer.subscription.resumed": self._subscription_changed,
            "invoice.paid": self._invoice,
            "invoice.payment_failed": self._invoice,
            "invoice.payment_action_required": self._invoice,
            # The refund of a failed provisioning (its metadata names the subscription).
            "refund.created": self._refund_changed,
            "refund.updated": self._refund_changed,
            "refund.failed": self._refund_changed,
        }

    async def __call__(self, event: InboxEvent) -> None:
        if event.type == "setup_intent.succeeded":
            await self._setup_intent_succeeded(event)
            return
        handler = self._handlers.get(event.type)
        # Every invoice event moves the customer's invoice list, whether or not it moves the
        # subscription.
        invoice = self._invoices is not None and event.type.startswith("invoice.")
        record = await self._local_subscription(event) if handler or invoice else None
        if handler is None and not invoice:
            logger.info("Stripe event %s (%s) needs no action", event.id, event.type)
        elif record is None:
            logger.info(
                "Stripe event %s (%s) is about no subscription of ours", event.id, event.type
            )
        else:
            if handler is not None:
                await handler(event, record)
            if invoice and self._invoices is not None:
                await self._invoices.changed(
                    record, object_id(event.object), invoice_info(event.object)
                )
        # Audited once it has been applied, and once however often it is retried: an event
        # retried while Stripe was down used to leave a row per attempt. Its commit need not
        # wait for the disk: the inbox then marks the event processed, durably, which flushes
        # this row with it; a crash before that loses both and the event is handled again. At
        # 200 webhooks/s these were most of this process's WAL flushes left, each one waited
        # for by the webhooks' own commits (issue 15).
        async with self._pool.acquire() as conn:
            await record_event_audit(
                conn,
                f"stripe.{event.type}",
                event_id=event.id,
                user_id=record.user_id if record else None,
                subject_id=record.id if record else object_id(event.object),
                detail={"object_id": object_id(event.object)},
                wait_for_flush=False,
            )

    def batchable(self, event: InboxEvent) -> bool:
        return _confirms_payment(event)

    async def handle_many(self, conn: Connection, events: Sequence[InboxEvent]) -> Batch:
        """Fulfils paid Checkout Sessions (the events `batchable` chose) together, in the
        inbox's transaction. Given no events, it runs its statements on no rows (the intake's
        warm-up)."""
        confirmations = [
            PaymentConfirmation(
                event_id=event.id,
                event_type=event.type,
                subscription_id=lookout_id(event.object),
                checkout_session_id=object_id(event.object),
                stripe_subscription_id=object_id(event.object.get("subscription")),
                customer_id=object_id(event.object.get("customer")),
            )
            for event in events
        ]
        fulfilment = await self._lifecycle.fulfil_many(conn, confirmations)
        return Batch(fulfilment.event_ids, partial(self._lifecycle.announce, fulfilment))

    async def _local_subscription(self, event: InboxEvent) -> SubscriptionRecord | None:
        obj = event.object
        async with self._pool.acquire() as conn:
            ours = lookout_id(obj)
            if ours is None and event.type.startswith("invoice."):
                # An invoice carries its subscription's metadata: known before the checkout's
                # event has told which Stripe subscription is ours.
                ours = lookout_id(invoice_subscription_details(obj))
            if ours is not None and (found := await get_subscription(conn, ours)) is not None:
                return found
            if event.type.startswith("checkout.session."):
                return await get_subscription_by_session(conn, object_id(obj) or "")
            stripe_id = (
                invoice_subscription_id(obj)
                if event.type.startswith("invoice.")
                else object_id(obj)
            )
            return await get_subscription_by_stripe_id(conn, stripe_id) if stripe_id else None

    async def _checkout_completed(self, event: InboxEvent, record: SubscriptionRecord) -> None:
        if event.object.get("payment_status") in PAID:
            await self._checkout_paid(event, record)
        else:
            logger.info("checkout %s completed unpaid: waiting for its async payment", record.id)

    async def _checkout_paid(self, event: InboxEvent, record: SubscriptionRecord) -> None:
        await self._lifecycle.fulfil(
            record.id,
            stripe_subscription_id=object_id(event.object.get("subscription")),
            customer_id=object_id(event.object.get("customer")),
            source=event.type,
        )

    async def _checkout_payment_failed(self, event: InboxEvent, record: SubscriptionRecord) -> None:
        await self._lifecycle.set_status(
            record.id, "failed", only_from=frozenset({"pending_payment"}), reason=event.type
        )

    async def _checkout_expired(self, event: InboxEvent, record: SubscriptionRecord) -> None:
        await self._lifecycle.set_status(
            record.id, "expired", only_from=frozenset({"pending_payment"}), reason=event.type
        )

    async def _subscription_changed(self, event: InboxEvent, record: SubscriptionRecord) -> None:
        stripe_id = object_id(event.object)
        if stripe_id is not None:
            await self._apply_current(record, stripe_id, event, fallback=event.object)

    async def _invoice(self, event: InboxEvent, record: SubscriptionRecord) -> None:
        stripe_id = invoice_subscription_id(event.object) or record.stripe_subscription_id
        if stripe_id is None:
            return
        fallback_status = {
            "invoice.paid": "active",
            "invoice.payment_failed": "past_due",
            "invoice.payment_action_required": "past_due",
        }[event.type]
        await self._apply_current(
            record, stripe_id, event, fallback={"id": stripe_id, "status": fallback_status}
        )

    async def _refund_changed(self, event: InboxEvent, record: SubscriptionRecord) -> None:
        refund_id = object_id(event.object)
        if refund_id is None:
            return
        # Delivered late or out of order: Stripe's current state, not the payload's.
        try:
            refund = await self._provider.retrieve_refund(refund_id)
        except PaymentProviderNotFound:
            logger.warning("refund %s of %s is unknown to Stripe", refund_id, record.id)
            return
        await self._lifecycle.refund_changed(record.id, refund, source=event.type)

    async def _apply_current(
        self,
        record: SubscriptionRecord,
        stripe_id: str,
        event: InboxEvent,
        *,
        fallback: Mapping[str, Any],
    ) -> None:
        fetched_at = datetime.now(UTC)
        try:
            info = await self._provider.retrieve_subscription(stripe_id)
        except PaymentProviderNotFound:
            state = _state_from_payload(fallback, record, event.created)
        else:
            state = StripeState.fetched(info, fetched_at)
        await self._lifecycle.apply_stripe_state(record.id, state, source=event.type)

    async def _setup_intent_succeeded(self, event: InboxEvent) -> None:
        customer = object_id(event.object.get("customer"))
        async with self._pool.acquire() as conn:
            updated = await mark_payment_method(conn, customer)
            await record_audit(
                conn,
                "stripe.setup_intent.succeeded",
                user_id=updated[0]["user_id"] if updated else None,
                subject_id=customer,
                detail={"event_id": event.id, "subscriptions": [r["id"] for r in updated]},
            )


def _confirms_payment(event: InboxEvent) -> bool:
    if event.type == "checkout.session.async_payment_succeeded":
        return True
    return event.type == "checkout.session.completed" and event.object.get("payment_status") in PAID


def _state_from_payload(
    obj: Mapping[str, Any], record: SubscriptionRecord, created: datetime
) -> StripeState:
    return StripeState(
        stripe_id=object_id(obj) or record.stripe_subscription_id or "",
        status=str(obj.get("status", "")),
        customer_id=object_id(obj.get("customer")),
        cancel_at_period_end=(
            bool(obj.get("cancel_at_period_end")) or obj.get("cancel_at") is not None
            if "cancel_at_period_end" in obj
            else record.cancel_at_period_end
        ),
        current_period_end=period_end(obj),
        observed_at=created,
        cancel_at=(
            timestamp(obj.get("cancel_at"))
            or (period_end(obj) if obj.get("cancel_at_period_end") else None)
            if "cancel_at_period_end" in obj
            else record.cancel_at
        ),
    )
