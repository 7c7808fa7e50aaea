"""A customer's invoices, as Stripe keeps them: listed for `GET /v1/invoices` (cached briefly),
and announced as `invoice.updated` on the user's stream whenever Stripe sends an `invoice.*`
event about one of the user's subscriptions."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

import asyncpg
from redis.exceptions import RedisError

from app.billing.provider import InvoiceInfo, PaymentProvider, PaymentProviderNotFound
from app.billing.subscriptions import SubscriptionRecord, list_subscriptions
from streams import Event, EventPublisher, RedisClient, isoformat_z, user_topic

__all__ = ["INVOICE_CACHE_SECONDS", "Invoices", "invoice_json"]

logger = logging.getLogger(__name__)

# Long enough that a dashboard reloading (or several tabs opening) asks Stripe once, short
# enough that nothing stays stale for long; an invoice event drops the user's copy at once.
INVOICE_CACHE_SECONDS = 15
_LONG_AGO = datetime.min.replace(tzinfo=UTC)


def invoice_json(info: InvoiceInfo, subscription_id: str | None) -> dict[str, Any]:
    """An invoice as `GET /v1/invoices` lists it and `invoice.updated` carries it;
    `subscription_id` is Lookout's."""
    return {
        "id": info.id,
        "number": info.number,
        "status": info.status,
        "amount_due": info.amount_due,
        "amount_paid": info.amount_paid,
        "currency": info.currency,
        "period_start": isoformat_z(info.period_start) if info.period_start else None,
        "period_end": isoformat_z(info.period_end) if info.period_end else None,
        "hosted_invoice_url": info.hosted_invoice_url,
        "subscription_id": subscription_id,
    }


class Invoices:
    def __init__(
        self,
        pool: asyncpg.Pool,
        provider: PaymentProvider,
        redis: RedisClient,
        publisher: EventPublisher,
        *,
        prefix: str,
    ) -> None:
        self._pool = pool
        self._provider = provider
        self._redis = redis
        self._publisher = publisher
        self._prefix = prefix

    def _cache_key(self, user_id: str) -> str:
        return f"{self._prefix}invoices:{user_id}"

    async def list_for_user(self, user_id: str) -> list[dict[str, Any]]:
        """The invoices of every Stripe Customer the user has paid with, newest first.
        Raises `PaymentProviderError` when Stripe cannot answer."""
        key = self._cache_key(user_id)
        try:
            cached = await self._redis.get(key)
        except (RedisError, OSError):
            logger.warning("the invoice cache cannot be read; asking Stripe", exc_info=True)
            cached = None
        if cached is not None:
            listed: list[dict[str, Any]] = json.loads(cached)
            return listed
        async with self._pool.acquire() as conn:
            subscriptions = await list_subscriptions(conn, user_id)
        ours = {s.stripe_subscription_id: s.id for s in subscriptions if s.stripe_subscription_id}
        mine = {s.id for s in subscriptions}
        # Newest subscription first; the same customer once. Only the user's own customers
        # are asked about, so another user's invoices cannot appear here.
        customers = list(dict.fromkeys(s.stripe_customer_id for s in subscriptions))
        found: list[InvoiceInfo] = []
        for customer in customers:
            if customer:
                found += await self._provider.list_invoices(customer)
        found.sort(key=lambda i: i.created or _LONG_AGO, reverse=True)
        listed = [
            invoice_json(info, _lookout_id(info, ours, mine))
            for info in found
            if info.status != "draft"  # a draft is Stripe's work in progress, not a bill
        ]
        try:
            await self._redis.set(key, json.dumps(listed), ex=INVOICE_CACHE_SECONDS)
        except (RedisError, OSError):
            logger.warning("the invoice cache cannot be written", exc_info=True)
        return listed

    async def changed(
        self, record: SubscriptionRecord, invoice_id: str | None, as_sent: InvoiceInfo
    ) -> None:
        """An `invoice.*` event about `record`: the invoice as Stripe has it now (events come
        late and out of order; `as_sent`, the event's copy, if Stripe no longer has it), on the
        user's stream, and the user's cached list dropped."""
        if invoice_id is None:
            return
        try:
            info = await self._provider.retrieve_invoice(invoice_id)
        except PaymentProviderNotFound:
            info = as_sent
        try:
            await self._redis.delete(self._cache_key(record.user_id))
        except (RedisError, OSError):
            logger.warning("could not drop the invoice cache of %s", record.user_id)
        if info.status == "draft":
            return
        update = Event.create(
            "invoice.updated",
            subscription_id=record.id,
            invoice=invoice_json(info, record.id),
        )
        try:
            await self._publisher.publish(update, [user_topic(record.user_id)])
        except (RedisError, OSError):
            # The invoice is in Stripe; the next GET /v1/invoices shows it.
            logger.exception("could not publish invoice.updated for %s", invoice_id)


def _lookout_id(info: InvoiceInfo, ours: dict[str, str], mine: set[str]) -> str | None:
    if info.subscription_id and info.subscription_id in ours:
        return ours[info.subscription_id]
    tagged = info.lookout_subscription_id
    return tagged if tagged in mine else None
