"""`PaymentProvider` on Stripe's official SDK (async methods, retries on, API version pinned)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import stripe
from stripe.params import PriceCreateParams
from stripe.params.checkout import SessionCreateParams

from app.billing.plans import Plan, price_lookup_key, stripe_product_name
from app.billing.provider import (
    SUBSCRIPTION_ID_KEY,
    CheckoutSessionInfo,
    PaymentProviderError,
    PaymentProviderNotFound,
    PaymentProviderUnavailable,
    SubscriptionAlreadyCanceled,
    SubscriptionInfo,
)

__all__ = ["STRIPE_API_VERSION", "StripeHTTPXClient", "StripePaymentProvider"]

logger = logging.getLogger(__name__)

# Pinned: the payloads Lookout parses (period dates on subscription items, invoice `parent`)
# are this version's. Change it only together with the stripe package and the handlers.
STRIPE_API_VERSION = "2026-10-28.endive"

T = TypeVar("T")


class StripeHTTPXClient(stripe.HTTPXClient):
    """stripe's async client hands httpx the form body as `data=<str>`, which httpx 0.28
    deprecates with a DeprecationWarning on every POST (an error under `-W error`);
    `content=` puts the same bytes on the wire."""

    def _get_request_args_kwargs(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any
    ) -> Any:
        args, kwargs = super()._get_request_args_kwargs(method, url, headers, post_data)
        if isinstance(kwargs.get("data"), str | bytes):
            kwargs["content"] = kwargs.pop("data")
        return args, kwargs


def _translate(what: str, exc: stripe.StripeError) -> PaymentProviderError:
    message = exc.user_message or str(exc)
    status = exc.http_status
    if isinstance(exc, stripe.APIConnectionError | stripe.RateLimitError | stripe.APIError) or (
        status is not None and (status >= 500 or status == 409)
    ):
        return PaymentProviderUnavailable(f"{what}: Stripe is unavailable ({message}); retry later")
    if isinstance(exc, stripe.IdempotencyError):
        return PaymentProviderError(
            f"{what}: Stripe refused the idempotency key, used before with other parameters "
            f"({message}); use a new key for a different request"
        )
    if isinstance(exc, stripe.AuthenticationError | stripe.PermissionError):
        return PaymentProviderError(
            f"{what}: Stripe refused the API key ({message}); check STRIPE_API_KEY"
        )
    if status == 404:
        return PaymentProviderNotFound(f"{what}: {message}")
    return PaymentProviderError(f"{what}: {message}")


def _refused(exc: stripe.StripeError, status: int) -> bool:
    return isinstance(exc, stripe.InvalidRequestError) and exc.http_status == status


def _at(value: int) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def _ts(value: int | None) -> datetime | None:
    return None if value is None else _at(value)


def _id(value: Any) -> str | None:
    """An expandable field: an id, an expanded object, or None."""
    if value is None or isinstance(value, str):
        return value
    object_id = getattr(value, "id", None)
    return object_id if isinstance(object_id, str) else None


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    raw = value.to_dict() if hasattr(value, "to_dict") else dict(value)
    return {str(k): str(v) for k, v in raw.items()}


def session_info(session: stripe.checkout.Session) -> CheckoutSessionInfo:
    return CheckoutSessionInfo(
        id=session.id,
        status=session.status or "open",
        payment_status=session.payment_status,
        url=session.url,
        metadata=_metadata(session.metadata),
        subscription_id=_id(session.subscription),
        customer_id=_id(session.customer),
        client_reference_id=session.client_reference_id,
        created=_at(session.created),
        expires_at=_at(session.expires_at),
    )


def subscription_info(sub: stripe.Subscription) -> SubscriptionInfo:
    items = list(sub.items.data)
    first = items[0] if items else None
    return SubscriptionInfo(
        id=sub.id,
        status=sub.status,
        customer_id=_id(sub.customer) or "",
        metadata=_metadata(sub.metadata),
        cancel_at_period_end=sub.cancel_at_period_end,
        # Current API versions keep the period on the items; a subscription has one here.
        current_period_start=_ts(first.current_period_start) if first else None,
        current_period_end=_ts(first.current_period_end) if first else None,
        created=_at(sub.created),
        cancel_at=_ts(sub.cancel_at),
        canceled_at=_ts(sub.canceled_at),
        ended_at=_ts(sub.ended_at),
        price_id=first.price.id if first else None,
        price_lookup_key=first.price.lookup_key if first else None,
        latest_invoice_id=_id(sub.latest_invoice),
        items=tuple(item.id for item in items),
    )


class StripePaymentProvider:
    """Talks to Stripe (or the emulator at `api_base`, an origin without `/v1`)."""

    def __init__(
        self,
        api_key: str,
        *,
        environment: str,
        api_base: str | None = None,
        max_network_retries: int = 2,
        timeout: float = 30.0,
    ) -> None:
        self._http = StripeHTTPXClient(timeout=timeout)
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base.rstrip("/")} if api_base else None,
            max_network_retries=max_network_retries,
            stripe_version=STRIPE_API_VERSION,
            http_client=self._http,
        )
        self.environment = environment
        self._prices: dict[str, str] = {}
        self._price_locks: dict[str, asyncio.Lock] = {}

    async def aclose(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]

    async def _call(self, what: str, request: Awaitable[T]) -> T:
        try:
            return await request
        except stripe.StripeError as exc:
            raise _translate(what, exc) from exc

    # -- prices --------------------------------------------------------------------------
    async def _find_price(self, lookup_key: str) -> stripe.Price | None:
        listed = await self._call(
            f"listing the price {lookup_key}",
            self._client.v1.prices.list_async(params={"lookup_keys": [lookup_key], "limit": 1}),
        )
        return listed.data[0] if listed.data else None

    @staticmethod
    def _fits(price: stripe.Price, plan: Plan) -> bool:
        r, want = price.recurring, plan.price
        same = (price.unit_amount, price.currency) == (want.amount, want.currency)
        return (
            price.active
            and same
            and r is not None
            and (r.interval, r.interval_count) == (want.interval, 1)
        )

    async def ensure_price(self, plan: Plan) -> str:
        key = price_lookup_key(plan, self.environment)
        if key in self._prices:
            return self._prices[key]
        lock = self._price_locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key in self._prices:
                return self._prices[key]
            found = await self._find_price(key)
            if found is not None and self._fits(found, plan):
                self._prices[key] = found.id
                return found.id
            created = await self._create_price(plan, key, replacing=found)
            # Another process may have moved the key meanwhile: the key's holder wins.
            holder = await self._find_price(key)
            price_id = holder.id if holder is not None and self._fits(holder, plan) else created.id
            self._prices[key] = price_id
            return price_id

    async def _create_price(
        self, plan: Plan, key: str, *, replacing: stripe.Price | None
    ) -> stripe.Price:
        tags = {"lookout_plan": plan.name, "lookout_environment": self.environment}
        params: PriceCreateParams = {
            "currency": plan.price.currency,
            "unit_amount": plan.price.amount,
            "recurring": {"interval": plan.price.interval},
            "lookup_key": key,
            "metadata": tags,
        }
        if replacing is None:
            params["product_data"] = {
                "name": stripe_product_name(plan, self.environment),
                "metadata": tags,
            }
        else:
            # A new amount for the same plan: a new Price of the same Product takes the key.
            params["product"] = _id(replacing.product) or ""
            params["transfer_lookup_key"] = True
        price = plan.price
        # Concurrent creators (several processes) send the same key: Stripe creates one Price.
        idempotency_key = f"lookout-price-{key}-{price.amount}-{price.currency}-{price.interval}"
        logger.info("creating the Stripe price %s (%s)", key, idempotency_key)
        return await self._call(
            f"creating the price {key}",
            self._client.v1.prices.create_async(
                params=params, options={"idempotency_key": idempotency_key}
            ),
        )

    # -- checkout ------------------------------------------------------------------------
    async def create_checkout_session(
        self,
        *,
        plan: Plan,
        lookout_subscription_id: str,
        success_url: str,
        cancel_url: str,
        customer_id: str | None = None,
        customer_email: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> CheckoutSessionInfo:
        price_id = await self.ensure_price(plan)
        tags = {
            **(metadata or {}),
            SUBSCRIPTION_ID_KEY: lookout_subscription_id,
            "lookout_plan": plan.name,
        }
        params: SessionCreateParams = {
            "mode": "subscription",
            "line_items": [{"price": price_id, "quantity": 1}],
            "success_url": success_url,
            "cancel_url": cancel_url,
            "client_reference_id": lookout_subscription_id,
            "metadata": tags,
            "subscription_data": {"metadata": tags},
        }
        if customer_id:
            params["customer"] = customer_id
        elif customer_email:
            params["customer_email"] = customer_email
        session = await self._call(
            f"creating a checkout session for {lookout_subscription_id}",
            self._client.v1.checkout.sessions.create_async(
                params=params,
                options={"idempotency_key": f"lookout-checkout-{lookout_subscription_id}"},
            ),
        )
        return session_info(session)

    async def retrieve_checkout_session(self, session_id: str) -> CheckoutSessionInfo:
        session = await self._call(
            f"retrieving the checkout session {session_id}",
            self._client.v1.checkout.sessions.retrieve_async(session_id),
        )
        return session_info(session)

    async def expire_checkout_session(self, session_id: str) -> CheckoutSessionInfo:
        try:
            session = await self._client.v1.checkout.sessions.expire_async(
                session_id, options={"idempotency_key": f"lookout-expire-{session_id}"}
            )
        except stripe.StripeError as exc:
            if not _refused(exc, 400):
                raise _translate(f"expiring the checkout session {session_id}", exc) from exc
            # No longer open (paid or expired already): its current state says which.
            return await self.retrieve_checkout_session(session_id)
        return session_info(session)

    # -- subscriptions ---------------------------------------------------------------------
    async def retrieve_subscription(self, subscription_id: str) -> SubscriptionInfo:
        sub = await self._call(
            f"retrieving the subscription {subscription_id}",
            self._client.v1.subscriptions.retrieve_async(subscription_id),
        )
        return subscription_info(sub)

    async def set_cancel_at_period_end(
        self, subscription_id: str, cancel: bool, *, idempotency_key: str
    ) -> SubscriptionInfo:
        what = f"setting cancel_at_period_end={cancel} on {subscription_id}"
        try:
            sub = await self._client.v1.subscriptions.update_async(
                subscription_id,
                params={"cancel_at_period_end": cancel},
                options={"idempotency_key": idempotency_key},
            )
        except stripe.StripeError as exc:
            if (
                _refused(exc, 400)
                and (await self.retrieve_subscription(subscription_id)).status == "canceled"
            ):
                raise SubscriptionAlreadyCanceled(
                    f"{what}: it has already ended in Stripe"
                ) from exc
            raise _translate(what, exc) from exc
        return subscription_info(sub)

    async def cancel_subscription_now(
        self, subscription_id: str, *, idempotency_key: str
    ) -> SubscriptionInfo:
        what = f"cancelling {subscription_id}"
        try:
            sub = await self._client.v1.subscriptions.cancel_async(
                subscription_id, options={"idempotency_key": idempotency_key}
            )
        except stripe.StripeError as exc:
            # Stripe answers 404 "No such subscription" for one that is already canceled.
            if _refused(exc, 404):
                current = await self.retrieve_subscription(subscription_id)
                if current.status == "canceled":
                    logger.info("%s: already canceled in Stripe", what)
                    return current
            raise _translate(what, exc) from exc
        return subscription_info(sub)
