"""What billing refuses, in the customer's words, without HTTP: each refusal names its `code`,
and app.web.errors chooses the status it is answered with."""

from __future__ import annotations

__all__ = [
    "BillingRefusal",
    "CardDeclined",
    "CheckoutUnavailable",
    "InvalidSignature",
    "MissingSignature",
    "NoPaymentMethod",
    "NotAStripeEvent",
    "PaymentInProgress",
    "PaymentRequired",
    "PlanLimitReached",
    "ResourceNameTaken",
    "WebhookRejected",
]


class BillingRefusal(Exception):
    code = "refused"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ResourceNameTaken(BillingRefusal):
    code = "resource_name_taken"


class PlanLimitReached(BillingRefusal):
    code = "plan_limit_reached"


class CheckoutUnavailable(BillingRefusal):
    """Stripe could not start a checkout; nothing was charged and asking again may work."""

    code = "payment_provider_unavailable"
    retry_after_seconds = 5


class PaymentInProgress(BillingRefusal):
    """A saved card is being charged for this name; its outcome is Stripe's to tell."""

    code = "payment_in_progress"


class PaymentRequired(BillingRefusal):
    """A payment could not be taken: nothing was charged and nothing was kept."""


class NoPaymentMethod(PaymentRequired):
    code = "payment_method_required"


class CardDeclined(PaymentRequired):
    code = "card_declined"


class WebhookRejected(BillingRefusal):
    """A webhook delivery that is not a verified Stripe event. Only these count against the
    sender's address (app.web.routes.billing), a valid delivery never."""


class MissingSignature(WebhookRejected):
    code = "missing_signature"


class InvalidSignature(WebhookRejected):
    code = "invalid_signature"


class NotAStripeEvent(WebhookRejected):
    code = "invalid_payload"
