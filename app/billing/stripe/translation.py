"""Translating the Stripe SDK's objects and errors into the provider's own types.

`StripePaymentProvider` calls Stripe; this module is what it makes of the answers: a
`StripeError` becomes a `PaymentProviderError` subclass the caller can act on (retry, fix the
key, give up), and a Session or Subscription becomes a `CheckoutSessionInfo` or
`SubscriptionInfo`, so nothing outside the provider sees an SDK type.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import stripe

from app.billing.provider import (
    CheckoutSessionInfo,
    PaymentProviderError,
    PaymentProviderNotFound,
    PaymentProviderUnavailable,
    RefundInfo,
    SubscriptionInfo,
)

__all__ = [
    "expandable_id",
    "refund_info",
    "refused",
    "session_info",
    "subscription_info",
    "translate_error",
]


def translate_error(what: str, exc: stripe.StripeError) -> PaymentProviderError:
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


def refused(exc: stripe.StripeError, status: int) -> bool:
    return isinstance(exc, stripe.InvalidRequestError) and exc.http_status == status


def _at(value: int) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def _ts(value: int | None) -> datetime | None:
    return None if value is None else _at(value)


def expandable_id(value: Any) -> str | None:
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
        subscription_id=expandable_id(session.subscription),
        customer_id=expandable_id(session.customer),
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
        customer_id=expandable_id(sub.customer) or "",
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
        latest_invoice_id=expandable_id(sub.latest_invoice),
        items=tuple(item.id for item in items),
    )


def refund_info(refund: stripe.Refund) -> RefundInfo:
    return RefundInfo(
        id=refund.id,
        amount=refund.amount,
        currency=refund.currency,
        status=refund.status or "pending",
        payment_intent_id=expandable_id(refund.payment_intent),
    )
