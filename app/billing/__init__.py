"""Billing: the plan catalog and the payment provider (Stripe)."""

from __future__ import annotations

from app.billing.plans import PLANS, Plan, PlanLimits, PlanPrice, UnknownPlan, get_plan
from app.billing.provider import (
    CheckoutSessionInfo,
    PaymentProvider,
    PaymentProviderError,
    PaymentProviderNotFound,
    PaymentProviderUnavailable,
    SubscriptionAlreadyCanceled,
    SubscriptionInfo,
)
from app.billing.stripe_provider import STRIPE_API_VERSION, StripePaymentProvider

__all__ = [
    "PLANS",
    "STRIPE_API_VERSION",
    "CheckoutSessionInfo",
    "PaymentProvider",
    "PaymentProviderError",
    "PaymentProviderNotFound",
    "PaymentProviderUnavailable",
    "Plan",
    "PlanLimits",
    "PlanPrice",
    "StripePaymentProvider",
    "SubscriptionAlreadyCanceled",
    "SubscriptionInfo",
    "UnknownPlan",
    "get_plan",
]
