"""What Lookout needs from a payment provider, in Lookout's own terms.

Implementations return these small frozen dataclasses, never SDK objects, and raise only the
exceptions below. Every method that changes something in the provider is safe to retry: creates
and cancellations carry deterministic idempotency keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from app.billing.plans import Plan

__all__ = [
    "CheckoutSessionInfo",
    "InvoiceInfo",
    "PaymentDeclined",
    "PaymentMethodRequired",
    "PaymentNeedsAuthentication",
    "PaymentProvider",
    "PaymentProviderError",
    "PaymentProviderNotFound",
    "PaymentProviderUnavailable",
    "RefundInfo",
    "SubscriptionAlreadyCanceled",
    "SubscriptionInfo",
]

# The metadata key, on the Checkout Session and on the subscription, naming our subscription.
SUBSCRIPTION_ID_KEY = "lookout_subscription_id"


class PaymentProviderError(Exception):
    """The provider refused the request; retrying the same request will not help."""


class PaymentProviderUnavailable(PaymentProviderError):
    """The provider could not be reached or failed on its side (network, 5xx, 429, 409).
    The request is safe to retry later: it carries the same idempotency key each time."""


class PaymentProviderNotFound(PaymentProviderError):
    """The provider has no object with that id (check the id and the API key's account)."""


class SubscriptionAlreadyCanceled(PaymentProviderError):
    """The subscription has ended in the provider; only its metadata can still change."""


# -- subscribing with a saved payment method (issue 13) -----------------------------------------
class PaymentMethodRequired(PaymentProviderError):
    """The customer has no default payment method to charge: pay through Checkout instead."""


class PaymentDeclined(PaymentProviderError):
    """The customer's saved payment method was declined; nothing was created or charged."""


class PaymentNeedsAuthentication(PaymentDeclined):
    """The bank asks the customer to authenticate the payment (SCA), which only an on-session
    flow such as Checkout can do; nothing was created or charged."""


@dataclass(frozen=True)
class CheckoutSessionInfo:
    id: str
    status: str  # "open" | "complete" | "expired"
    payment_status: str  # "paid" | "unpaid" | "no_payment_required"
    url: str | None  # the hosted page; None once the session is complete or expired
    metadata: Mapping[str, str]
    subscription_id: str | None  # the provider's subscription, once the customer paid
    customer_id: str | None
    client_reference_id: str | None
    created: datetime
    expires_at: datetime

    @property
    def lookout_subscription_id(self) -> str | None:
        return self.metadata.get(SUBSCRIPTION_ID_KEY)

    @property
    def is_paid(self) -> bool:
        return self.status == "complete" and self.payment_status in ("paid", "no_payment_required")


@dataclass(frozen=True)
class SubscriptionInfo:
    id: str
    status: str  # Stripe's: active, past_due, unpaid, canceled, incomplete, paused, ...
    customer_id: str
    metadata: Mapping[str, str]
    cancel_at_period_end: bool
    current_period_start: datetime | None  # from the subscription item (current API shape)
    current_period_end: datetime | None
    created: datetime
    cancel_at: datetime | None = None
    canceled_at: datetime | None = None
    ended_at: datetime | None = None
    price_id: str | None = None
    price_lookup_key: str | None = None
    latest_invoice_id: str | None = None
    items: tuple[str, ...] = field(default=())  # subscription item ids

    @property
    def lookout_subscription_id(self) -> str | None:
        return self.metadata.get(SUBSCRIPTION_ID_KEY)


@dataclass(frozen=True)
class InvoiceInfo:
    id: str
    number: str | None  # None while a draft
    status: str | None  # Stripe's: draft, open, paid, uncollectible, void
    amount_due: int  # minor units
    amount_paid: int
    currency: str
    # The period billed: its lines' (a subscription's invoice bills the period ahead), else
    # the invoice's own.
    period_start: datetime | None
    period_end: datetime | None
    hosted_invoice_url: str | None
    customer_id: str | None
    subscription_id: str | None  # the provider's subscription
    created: datetime | None
    metadata: Mapping[str, str] = field(default_factory=dict)  # its subscription's, if any

    @property
    def lookout_subscription_id(self) -> str | None:
        return self.metadata.get(SUBSCRIPTION_ID_KEY)


@dataclass(frozen=True)
class RefundInfo:
    """Money given back for a payment: `amount` in minor units."""

    id: str
    amount: int
    currency: str
    status: str  # Stripe's: pending, requires_action, succeeded, failed, canceled
    payment_intent_id: str | None


class PaymentProvider(Protocol):
    async def ensure_price(self, plan: Plan) -> str:
        """The provider's price id for `plan` in this environment, found by lookup key or
        created once (also when several processes ask at the same time)."""
        ...

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
        """A hosted checkout in subscription mode. `lookout_subscription_id` goes into the
        session's and the subscription's metadata and `client_reference_id`, and derives the
        idempotency key: asking twice for the same subscription gives the same session.
        `success_url` may contain `{CHECKOUT_SESSION_ID}`."""
        ...

    async def retrieve_checkout_session(self, session_id: str) -> CheckoutSessionInfo: ...

    async def expire_checkout_session(self, session_id: str) -> CheckoutSessionInfo:
        """Expire an open session; a session that is no longer open is returned as it is
        (check `status`: a `complete` one was paid and must not be treated as abandoned)."""
        ...

    async def retrieve_subscription(self, subscription_id: str) -> SubscriptionInfo: ...

    async def set_cancel_at_period_end(
        self, subscription_id: str, cancel: bool, *, idempotency_key: str
    ) -> SubscriptionInfo:
        """Cancel at the end of the period (`cancel=True`) or undo any scheduled cancellation,
        however it was set (`cancel=False`: the Customer Portal sets a date, not the flag).
        Raises `SubscriptionAlreadyCanceled` when the subscription has already ended."""
        ...

    async def create_billing_portal_session(self, customer_id: str, *, return_url: str) -> str:
        """The URL of a Customer Portal session for `customer_id`, coming back to
        `return_url`. Short-lived: make one each time the customer asks."""
        ...

    async def list_invoices(self, customer_id: str) -> list[InvoiceInfo]:
        """The customer's invoices, newest first (the latest 100)."""
        ...

    async def retrieve_invoice(self, invoice_id: str) -> InvoiceInfo: ...

    async def cancel_subscription_now(
        self, subscription_id: str, *, idempotency_key: str
    ) -> SubscriptionInfo:
        """End the subscription at once. One that is already canceled counts as success."""
        ...

    # -- customers and refunds -------------------------------------------------------------
    async def create_customer(
        self, *, email: str, lookout_user_id: str, idempotency_key: str
    ) -> str:
        """A new Customer for a Lookout user; answers its id. The same key gives the same
        Customer, also to concurrent callers."""
        ...

    async def refund_first_payment(
        self,
        subscription_id: str,
        *,
        idempotency_key: str,
        metadata: Mapping[str, str] | None = None,
    ) -> RefundInfo | None:
        """Gives back the whole payment of the subscription's first invoice (the one paid at
        Checkout), under `idempotency_key`, with `metadata` on the refund; None when nothing
        was paid. A payment refunded already (under another key) answers that refund, not an
        error."""
        ...

    async def retrieve_refund(self, refund_id: str) -> RefundInfo: ...

    # -- plan changes (issue 13) -------------------------------------------------------------
    async def change_price(
        self, subscription_id: str, plan: Plan, *, upgrade: bool, idempotency_key: str
    ) -> SubscriptionInfo:
        """Moves the subscription's item to `plan`'s price, prorated: an upgrade is invoiced
        and charged at once (`proration_behavior=always_invoice`), a downgrade credits the
        unused time to the next invoice (`create_prorations`). Raises
        `SubscriptionAlreadyCanceled` when it has ended."""
        ...

    # -- subscribing with a saved payment method (issue 13) -------------------------------------
    async def default_payment_method(self, customer_id: str) -> str | None:
        """The id of the customer's default payment method for invoices, or None."""
        ...

    async def create_subscription(
        self, *, plan: Plan, customer_id: str, lookout_subscription_id: str
    ) -> SubscriptionInfo:
        """Subscribes the customer, charging the default payment method at once; the same
        `lookout_subscription_id` (in the metadata, deriving the idempotency key) gives the same
        subscription. Creates nothing when the payment cannot complete: raises
        `PaymentMethodRequired`, `PaymentDeclined` or `PaymentNeedsAuthentication`."""
        ...

    async def aclose(self) -> None: ...
