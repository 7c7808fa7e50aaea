"""`PaymentProvider` on Stripe's official SDK (async methods, retries on, API version pinned).

This module makes the calls (prices, checkout sessions, subscriptions) and decides what an
answer means for Lookout; `app.billing.stripe.translation` turns the SDK's objects and errors
into the provider's own types.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping
from typing import Any, Literal, TypeVar

import stripe
from stripe.params import (
    PriceCreateParams,
    RefundCreateParams,
    RefundListParams,
    SubscriptionUpdateParams,
)
from stripe.params.checkout import SessionCreateParams

from app.billing.plans import Plan, price_lookup_key, stripe_product_name
from app.billing.provider import (
    SUBSCRIPTION_ID_KEY,
    CheckoutSessionInfo,
    InvoiceInfo,
    PaymentDeclined,
    PaymentMethodRequired,
    PaymentNeedsAuthentication,
    PaymentProviderError,
    RefundInfo,
    SubscriptionAlreadyCanceled,
    SubscriptionInfo,
)
from app.billing.stripe.objects import invoice_info
from app.billing.stripe.translation import (
    expandable_id,
    refund_info,
    refused,
    session_info,
    subscription_info,
    translate_error,
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
            raise translate_error(what, exc) from exc

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
            params["product"] = expandable_id(replacing.product) or ""
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
            if not refused(exc, 400):
                raise translate_error(f"expiring the checkout session {session_id}", exc) from exc
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
        sub = await self._update_subscription(
            subscription_id,
            {"cancel_at_period_end": cancel},
            idempotency_key=idempotency_key,
            what=f"setting cancel_at_period_end={cancel} on {subscription_id}",
        )
        if not cancel and sub.cancel_at is not None:
            # The Customer Portal of flexible billing mode (the default for new subscriptions)
            # schedules the end by `cancel_at` alone, which cancel_at_period_end=false leaves
            # in place. Stripe takes one of the two parameters per request.
            sub = await self._update_subscription(
                subscription_id,
                {"cancel_at": ""},
                idempotency_key=f"{idempotency_key}-cancel-at",
                what=f"clearing cancel_at on {subscription_id}",
            )
        return subscription_info(sub)

    async def _update_subscription(
        self,
        subscription_id: str,
        params: SubscriptionUpdateParams,
        *,
        idempotency_key: str,
        what: str,
    ) -> stripe.Subscription:
        try:
            return await self._client.v1.subscriptions.update_async(
                subscription_id, params=params, options={"idempotency_key": idempotency_key}
            )
        except stripe.StripeError as exc:
            if (
                refused(exc, 400)
                and (await self.retrieve_subscription(subscription_id)).status == "canceled"
            ):
                raise SubscriptionAlreadyCanceled(
                    f"{what}: it has already ended in Stripe"
                ) from exc
            raise translate_error(what, exc) from exc

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
            if refused(exc, 404):
                current = await self.retrieve_subscription(subscription_id)
                if current.status == "canceled":
                    logger.info("%s: already canceled in Stripe", what)
                    return current
            raise translate_error(what, exc) from exc
        return subscription_info(sub)

    # -- the Customer Portal and invoices ------------------------------------------------------
    async def create_billing_portal_session(self, customer_id: str, *, return_url: str) -> str:
        session = await self._call(
            f"opening the billing portal of {customer_id}",
            self._client.v1.billing_portal.sessions.create_async(
                params={"customer": customer_id, "return_url": return_url}
            ),
        )
        return session.url

    async def list_invoices(self, customer_id: str) -> list[InvoiceInfo]:
        listed = await self._call(
            f"listing the invoices of {customer_id}",
            self._client.v1.invoices.list_async(params={"customer": customer_id, "limit": 100}),
        )
        return [invoice_info(invoice.to_dict()) for invoice in listed.data]

    async def retrieve_invoice(self, invoice_id: str) -> InvoiceInfo:
        invoice = await self._call(
            f"retrieving the invoice {invoice_id}",
            self._client.v1.invoices.retrieve_async(invoice_id),
        )
        return invoice_info(invoice.to_dict())

    # -- customers and refunds -------------------------------------------------------------
    async def create_customer(
        self, *, email: str, lookout_user_id: str, idempotency_key: str
    ) -> str:
        customer = await self._call(
            f"creating the customer of {lookout_user_id}",
            self._client.v1.customers.create_async(
                params={"email": email, "metadata": {"lookout_user_id": lookout_user_id}},
                options={"idempotency_key": idempotency_key},
            ),
        )
        return customer.id

    async def refund_first_payment(
        self,
        subscription_id: str,
        *,
        idempotency_key: str,
        metadata: Mapping[str, str] | None = None,
    ) -> RefundInfo | None:
        payment = await self._first_payment(subscription_id)
        if payment is None:
            return None
        kind, payment_id = payment
        what = f"refunding {payment_id} of {subscription_id}"
        params: RefundCreateParams = {
            "reason": "requested_by_customer",
            "metadata": {**(metadata or {}), "lookout_stripe_subscription": subscription_id},
        }
        params[kind] = payment_id
        try:
            refund = await self._client.v1.refunds.create_async(
                params=params, options={"idempotency_key": idempotency_key}
            )
        except stripe.StripeError as exc:
            # Refunded before under another key (one that Stripe has forgotten after 24 hours,
            # or a refund made in the Dashboard): that refund is the answer.
            if not (refused(exc, 400) and exc.code == "charge_already_refunded"):
                raise translate_error(what, exc) from exc
            logger.info("%s: refunded already", what)
            return await self._existing_refund(kind, payment_id, what)
        return refund_info(refund)

    async def retrieve_refund(self, refund_id: str) -> RefundInfo:
        refund = await self._call(
            f"retrieving the refund {refund_id}", self._client.v1.refunds.retrieve_async(refund_id)
        )
        return refund_info(refund)

    async def _first_payment(
        self, subscription_id: str
    ) -> tuple[Literal["payment_intent", "charge"], str] | None:
        """What paid the subscription's first invoice: its PaymentIntent (or, for an old
        invoice, its Charge). Current API versions link them through `invoice_payments`."""
        invoices = await self._call(
            f"listing the paid invoices of {subscription_id}",
            self._client.v1.invoices.list_async(
                params={"subscription": subscription_id, "status": "paid", "limit": 100}
            ),
        )
        first = next((i for i in invoices.data if i.billing_reason == "subscription_create"), None)
        if first is None or not first.amount_paid or first.id is None:
            return None
        payments = await self._call(
            f"listing the payments of {first.id}",
            self._client.v1.invoice_payments.list_async(
                params={"invoice": first.id, "status": "paid"}
            ),
        )
        for paid in payments.data:
            if paid.payment.type == "payment_intent" and paid.payment.payment_intent:
                return "payment_intent", expandable_id(paid.payment.payment_intent) or ""
            if paid.payment.type == "charge" and paid.payment.charge:
                return "charge", expandable_id(paid.payment.charge) or ""
        return None

    async def _existing_refund(
        self, kind: Literal["payment_intent", "charge"], payment_id: str, what: str
    ) -> RefundInfo:
        params: RefundListParams = {"limit": 100}
        params[kind] = payment_id
        listed = await self._call(what, self._client.v1.refunds.list_async(params=params))
        given = [r for r in listed.data if r.status not in ("failed", "canceled")]
        if not given:
            raise PaymentProviderError(f"{what}: Stripe says it is refunded but lists no refund")
        newest = given[0]
        return RefundInfo(
            id=newest.id,
            amount=sum(r.amount for r in given),
            currency=newest.currency,
            status=newest.status or "pending",
            payment_intent_id=expandable_id(newest.payment_intent),
        )

    # -- plan changes (issue 13) -------------------------------------------------------------
    async def change_price(
        self, subscription_id: str, plan: Plan, *, upgrade: bool, idempotency_key: str
    ) -> SubscriptionInfo:
        price_id = await self.ensure_price(plan)
        current = await self.retrieve_subscription(subscription_id)
        if current.status == "canceled":
            raise SubscriptionAlreadyCanceled(f"changing the plan of {subscription_id}: it ended")
        if not current.items:
            raise PaymentProviderError(f"subscription {subscription_id} has no item to change")
        what = f"moving {subscription_id} to {plan.name}"
        sub = await self._call(
            what,
            self._client.v1.subscriptions.update_async(
                subscription_id,
                params={
                    "items": [{"id": current.items[0], "price": price_id}],
                    "proration_behavior": "always_invoice" if upgrade else "create_prorations",
                },
                options={"idempotency_key": idempotency_key},
            ),
        )
        return subscription_info(sub)

    # -- subscribing with a saved payment method (issue 13) -------------------------------------
    async def default_payment_method(self, customer_id: str) -> str | None:
        customer = await self._call(
            f"retrieving the customer {customer_id}",
            self._client.v1.customers.retrieve_async(customer_id),
        )
        settings = customer.invoice_settings
        return expandable_id(settings.default_payment_method) if settings else None

    async def create_subscription(
        self, *, plan: Plan, customer_id: str, lookout_subscription_id: str
    ) -> SubscriptionInfo:
        price_id = await self.ensure_price(plan)
        tags = {SUBSCRIPTION_ID_KEY: lookout_subscription_id, "lookout_plan": plan.name}
        what = f"subscribing {customer_id} to {plan.name} for {lookout_subscription_id}"
        try:
            sub = await self._client.v1.subscriptions.create_async(
                params={
                    "customer": customer_id,
                    "items": [{"price": price_id}],
                    "metadata": tags,
                    # Nothing is created unless the first invoice is paid now: no incomplete
                    # subscription for the customer to find and no invoice left open.
                    "payment_behavior": "error_if_incomplete",
                },
                options={"idempotency_key": f"lookout-subscribe-{lookout_subscription_id}"},
            )
        except stripe.CardError as exc:
            if exc.code == "authentication_required":
                raise PaymentNeedsAuthentication(f"{what}: {exc.user_message or exc}") from exc
            raise PaymentDeclined(f"{what}: {exc.user_message or exc}") from exc
        except stripe.StripeError as exc:
            if refused(exc, 400) and "payment method" in str(exc):
                raise PaymentMethodRequired(f"{what}: {exc.user_message or exc}") from exc
            raise translate_error(what, exc) from exc
        return subscription_info(sub)
