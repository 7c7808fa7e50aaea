"""What billing refuses, in the customer's words, without HTTP: each refusal names its `code`,
and app.web.errors chooses the status it is answered with. Also what counts as a dependency
away rather than a bug: `TRANSIENT_ERRORS` (`is_transient`: the webhook inbox retries the
event, a route answers 503) and the broader `OUTAGES` of the background sweeps."""

from __future__ import annotations

import asyncpg
import redis.exceptions
from redis.exceptions import RedisError

from app.billing.provider import PaymentProviderUnavailable
from provisioning import DATABASE_ERRORS

__all__ = [
    "OUTAGES",
    "TRANSIENT_ERRORS",
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
    "is_transient",
]

# PostgreSQL or Redis away (refused, reset, timed out: `TimeoutError` is an `OSError`): a sweep
# logs one line and tries again at the next one. Counted as crashes instead, a long outage
# would report the loops failing and turn /healthz 503, restarting a process that is fine.
OUTAGES: tuple[type[Exception], ...] = (*DATABASE_ERRORS, RedisError)


TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    PaymentProviderUnavailable,  # Stripe: network, 5xx, 429, 409 (billing.stripe.translation)
    OSError,  # sockets: ConnectionError, TimeoutError (asyncio's too)
    asyncpg.InterfaceError,  # a connection closed under us, a pool closing
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.OperatorInterventionError,  # class 57: shutdown, starting up, statement timeout
    asyncpg.InsufficientResourcesError,  # class 53: too many connections, disk full
    asyncpg.TransactionRollbackError,  # class 40: serialization failure, deadlock
    asyncpg.LockNotAvailableError,
    asyncpg.exceptions.InternalClientError,  # a terminated backend's pooled connection
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a replica promoted, or a failover under way
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.OutOfMemoryError,
)


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` means a dependency is unavailable for now (retry it), rather than that
    the work itself is wrong. A group is transient when everything in it is."""
    if isinstance(exc, BaseExceptionGroup):
        return all(is_transient(e) for e in exc.exceptions)
    return isinstance(exc, TRANSIENT_ERRORS)


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
