"""The billing routes of the contract: plans, checkout, subscriptions, the Stripe webhook."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from app.billing.checkout import RESOURCE_NAME
from app.billing.customers import stripe_customer_id
from app.billing.errors import WebhookRejected
from app.billing.lifecycle import StripeState
from app.billing.plans import PLANS, Plan, UnknownPlan, get_plan
from app.billing.provider import (
    PaymentProviderError,
    PaymentProviderNotFound,
    PaymentProviderUnavailable,
    SubscriptionAlreadyCanceled,
)
from app.billing.subscriptions import (
    ACTIVE_RESOURCE_STATUSES,
    SubscriptionRecord,
    count_billing_change,
    list_subscriptions,
)
from app.billing.updates import subscription_json
from app.billing.webhooks.intake import EventNotStorable, EventNotStored
from app.billing.webhooks.receiver import check_signature_header, parse_event, verify_signature
from app.users import User
from app.web.auth import authenticate, client_ip
from app.web.errors import APIError
from app.web.owned import owned_checkout, owned_graph, owned_subscription
from app.web.requests import read_capped_body, read_json, require_string
from app.web.services import services
from streams import StreamHandler

__all__ = ["acknowledgement_timed", "billing_routes", "stripe_webhook"]

logger = logging.getLogger(__name__)


async def plans(request: Request) -> Response:
    return JSONResponse({"data": [plan.as_json() for plan in PLANS.values()]})


async def _purchase(request: Request) -> tuple[User, Plan, str]:
    """The signed-in user and what they buy: `{"plan", "resource_name"}`."""
    user = await authenticate(request)
    body = await read_json(request)
    plan_name = require_string(body, "plan", hint=f"Choose one of: {', '.join(PLANS)}.")
    try:
        plan = get_plan(plan_name)
    except UnknownPlan as exc:
        raise APIError(400, "unknown_plan", str(exc)) from None
    resource_name = require_string(
        body,
        "resource_name",
        pattern=RESOURCE_NAME,
        hint="Use 3 to 40 lower-case letters, digits and dashes, starting with a letter.",
        label="name of your resource",
    )
    return user, plan, resource_name


async def create_checkout(request: Request) -> Response:
    user, plan, resource_name = await _purchase(request)
    record, session = await services(request).checkout.start(user, plan, resource_name)
    return JSONResponse(
        {
            "subscription_id": record.id,
            "checkout_session_id": session.id,
            "checkout_url": session.url,
            "status": record.status,
        },
        status_code=201,
    )


def events_url(request: Request, record: SubscriptionRecord) -> str:
    # From the configured origin, never the request's Host or X-Forwarded-Proto: a forged
    # Host would otherwise come back as a link the client follows with its credentials.
    base = services(request).settings.public_url
    if record.operation_id:
        return f"{base}/v1/operations/{record.operation_id}/events"
    return f"{base}/v1/events"


async def checkout_status(request: Request) -> Response:
    user = await authenticate(request)
    session_id = request.path_params["session_id"]
    record = await owned_checkout(request, user.id, session_id)
    record = await services(request).checkout.confirm(record)
    return JSONResponse(
        {
            "status": record.status,
            "subscription_id": record.id,
            "operation_id": record.operation_id,
            "events_url": events_url(request, record),
        }
    )


async def subscriptions(request: Request) -> Response:
    user = await authenticate(request)
    async with services(request).pool.acquire() as conn:
        records = await list_subscriptions(conn, user.id)
    return JSONResponse({"data": [subscription_json(r) for r in records]})


async def subscription(request: Request) -> Response:
    user = await authenticate(request)
    record = await owned_subscription(request, user.id, request.path_params["subscription_id"])
    return JSONResponse(subscription_json(record))


async def _set_cancel_at_period_end(request: Request, cancel: bool) -> Response:
    user = await authenticate(request)
    found = services(request)
    record = await owned_subscription(request, user.id, request.path_params["subscription_id"])
    if record.cancel_at_period_end == cancel:
        return JSONResponse(subscription_json(record))
    if record.stripe_subscription_id is None or record.status not in (
        ACTIVE_RESOURCE_STATUSES | {"provisioning"}
    ):
        raise APIError(
            409,
            "not_cancellable" if cancel else "not_reactivatable",
            f"A subscription that is {record.status} cannot be "
            + ("cancelled." if cancel else "reactivated."),
        )
    async with found.pool.acquire() as conn:
        changes = await count_billing_change(conn, record.id)
    action = "cancel" if cancel else "reactivate"
    asked_at = datetime.now(UTC)
    try:
        info = await found.provider.set_cancel_at_period_end(
            record.stripe_subscription_id,
            cancel,
            idempotency_key=f"lookout-{record.id}-{action}-{changes}",
        )
    except SubscriptionAlreadyCanceled:
        raise APIError(
            409, "already_canceled", "This subscription has ended in Stripe already."
        ) from None
    except PaymentProviderError as exc:
        raise provider_refusal(exc) from exc
    updated = await found.lifecycle.apply_stripe_state(
        record.id, StripeState.fetched(info, asked_at), source=f"api.{action}"
    )
    return JSONResponse(subscription_json(updated or record))


def provider_refusal(exc: PaymentProviderError) -> APIError:
    """What the customer is told when Stripe did not make a change: only an outage is worth
    trying again; a subscription Stripe does not know (its test data was reset, say) is not."""
    if isinstance(exc, PaymentProviderNotFound):
        return APIError(
            409,
            "unknown_to_stripe",
            "Stripe has no record of this subscription, so nothing changed."
            " Trying again will not help; contact support.",
        )
    if isinstance(exc, PaymentProviderUnavailable):
        return APIError(
            503,
            "payment_provider_unavailable",
            "Stripe did not answer; nothing changed. Try again in a moment.",
            headers={"Retry-After": "5"},
        )
    return APIError(
        502,
        "payment_provider_refused",
        "Stripe refused the change, so nothing changed. Contact support.",
    )


async def cancel(request: Request) -> Response:
    return await _set_cancel_at_period_end(request, True)


async def reactivate(request: Request) -> Response:
    return await _set_cancel_at_period_end(request, False)


# -- subscribing with a saved payment method (issue 13) ---------------------------------------
async def create_subscription(request: Request) -> Response:
    """201 the subscription, paid with the saved card (provisioning follows on Stripe's
    `invoice.paid`); when the bank asks for authentication, its `checkout_url` is where the
    customer confirms the payment. 402 `payment_method_required` without a saved card."""
    user, plan, resource_name = await _purchase(request)
    record, session = await services(request).checkout.subscribe(user, plan, resource_name)
    body = subscription_json(record)
    if session is not None:
        body["checkout_url"] = session.url
    return JSONResponse(body, status_code=201)


async def graph_subscription(request: Request) -> Response:
    user = await authenticate(request)
    graph_id = request.path_params["graph_id"]
    record = await owned_graph(request, user.id, graph_id)
    return JSONResponse(subscription_json(record))


async def stripe_webhook(request: Request) -> Response:
    found = services(request)
    header = request.headers.get("stripe-signature")
    try:
        check_signature_header(header)
        body = await read_capped_body(request)
        text = verify_signature(body, header, found.settings.stripe_webhook_secrets)
    except WebhookRejected:
        # Failed verifications are limited per address (a 429 once over), a valid delivery
        # never: only refusals ask the limiter, and one from an address known to be over
        # is refused before its body is read.
        await found.rate_limits.check("unverified_webhooks", client_ip(request))
        raise
    event = parse_event(text)
    try:
        new = await found.intake.store(event)
    except EventNotStorable:
        raise APIError(
            400, "invalid_payload", "The event contains characters that cannot be stored."
        ) from None
    except EventNotStored as exc:
        # Never 2xx without a commit: Stripe delivers it again.
        raise APIError(
            503,
            "unavailable",
            "The event could not be stored now; Stripe delivers it again.",
            headers={"Retry-After": str(exc.retry_after)},
        ) from None
    return JSONResponse({"received": True, "id": event.id, "duplicate": not new})


def acknowledgement_timed(handler: StreamHandler) -> StreamHandler:
    """``handler`` (the webhook's, as served ahead of the middleware), each 2xx answer timed
    into `lookout_webhook_ack_seconds`: from the route's entry to the answer's last byte handed
    to the connection. What the server adds to what Stripe waits for; the rest (the request
    waiting to be read, the network) is the client's side of the figure."""

    async def run(request: Request) -> ASGIApp:
        began = time.perf_counter()
        response = await handler(request)
        status = response.status_code if isinstance(response, Response) else 0

        async def answer(scope: Scope, receive: Receive, send: Send) -> None:
            await response(scope, receive, send)
            if 200 <= status < 300:
                services(request).metrics.webhook_ack.observe(time.perf_counter() - began)

        return answer

    return run


# -- the Customer Portal and invoices ------------------------------------------------------------
async def billing_portal(request: Request) -> Response:
    user = await authenticate(request)
    found = services(request)
    customer_id = await stripe_customer_id(found.pool, user.id)
    if customer_id is None:
        raise APIError(
            409,
            "no_billing_account",
            "You have no billing account yet: subscribe to a plan first, then manage your "
            "billing here.",
        )
    try:
        url = await found.provider.create_billing_portal_session(
            customer_id, return_url=f"{found.settings.public_url}/"
        )
    except PaymentProviderError as exc:
        raise APIError(
            503,
            "payment_provider_unavailable",
            "Stripe could not open the billing portal just now. Try again in a moment.",
            headers={"Retry-After": "5"},
        ) from exc
    return JSONResponse({"url": url}, status_code=201)


async def invoices(request: Request) -> Response:
    user = await authenticate(request)
    try:
        listed = await services(request).invoices.list_for_user(user.id)
    except PaymentProviderError as exc:
        raise APIError(
            503,
            "payment_provider_unavailable",
            "Stripe did not answer with your invoices. Try again in a moment.",
            headers={"Retry-After": "5"},
        ) from exc
    return JSONResponse({"data": listed})


billing_routes = [
    Route("/v1/plans", plans, methods=["GET"]),
    Route("/v1/checkout", create_checkout, methods=["POST"]),
    Route("/v1/checkout/{session_id}", checkout_status, methods=["GET"]),
    Route("/v1/subscriptions", subscriptions, methods=["GET"]),
    Route("/v1/subscriptions", create_subscription, methods=["POST"]),
    Route("/v1/subscriptions/{subscription_id}", subscription, methods=["GET"]),
    Route("/v1/subscriptions/{subscription_id}/cancel", cancel, methods=["POST"]),
    Route("/v1/subscriptions/{subscription_id}/reactivate", reactivate, methods=["POST"]),
    Route("/v1/graphs/{graph_id}/subscription", graph_subscription, methods=["GET"]),
    Route("/v1/billing/portal", billing_portal, methods=["POST"]),
    Route("/v1/invoices", invoices, methods=["GET"]),
    Route("/v1/webhooks/stripe", stripe_webhook, methods=["POST"]),
]
