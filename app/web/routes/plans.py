"""Issue 13's routes: changing a subscription's plan (`PATCH /v1/subscriptions/{id}`) and the
credentials of either kind of resource (`POST /v1/subscriptions/{id}/credentials`)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.billing.checkout import HOLDING
from app.billing.lifecycle import StripeState
from app.billing.plans import PLANS, Plan, UnknownPlan, get_plan, plan_limit_refusal
from app.billing.provider import PaymentProviderError, SubscriptionAlreadyCanceled
from app.billing.subscriptions import SubscriptionRecord, count_billing_change
from app.billing.updates import subscription_json
from app.web.auth import authenticate
from app.web.errors import APIError
from app.web.owned import owned_subscription
from app.web.requests import read_json, require_string
from app.web.services import Services, services
from provisioning import ResourceNotFound

__all__ = ["plan_routes"]

logger = logging.getLogger(__name__)

_NOUNS = {"graph": "graph", "repository": "repository login"}


async def subscription_credentials(request: Request) -> Response:
    """A graph's or a repository subscription's login, with a new password, shown once."""
    user = await authenticate(request)
    record = await owned_subscription(request, user.id, request.path_params["subscription_id"])
    noun = _NOUNS.get(record.resource_type, record.resource_type)
    if record.status != "active":
        raise APIError(
            409,
            "not_active",
            f"This subscription is {record.status.replace('_', ' ')}; its {noun}'s credentials"
            " can be revealed while it is active.",
        )
    try:
        credentials = await services(request).runner.rotate_credentials(record.resource_id)
    except ResourceNotFound:
        raise APIError(
            409, "not_active", f"Your {noun} is not ready yet; try again shortly."
        ) from None
    return JSONResponse(credentials.as_json(), headers={"Cache-Control": "no-store"})


async def change_plan(request: Request) -> Response:
    """Upgrade or downgrade within the resource type: in Stripe first (prorated), then the
    subscription and its resource follow (a `resize` operation, the answer's `operation_id`)."""
    user = await authenticate(request)
    found = services(request)
    record = await owned_subscription(request, user.id, request.path_params["subscription_id"])
    body = await read_json(request)
    name = require_string(body, "plan", hint=f"Choose one of: {', '.join(PLANS)}.")
    try:
        plan = get_plan(name)
    except UnknownPlan as exc:
        raise APIError(400, "unknown_plan", str(exc).capitalize() + ".") from None
    if plan.resource_type != record.resource_type:
        raise APIError(
            400,
            "wrong_resource_type",
            f"{plan.display_name} is a {plan.resource_type} plan and this subscription is for a"
            f" {record.resource_type}; choose a {record.resource_type} plan.",
        )
    if plan.name == record.plan:
        return JSONResponse(subscription_json(record))
    if record.status != "active" or record.stripe_subscription_id is None:
        raise APIError(
            409,
            "not_changeable",
            f"A subscription that is {record.status.replace('_', ' ')} cannot change plan;"
            + (" pay the open invoice first." if record.status == "past_due" else ""),
        )
    current = get_plan(record.plan)
    await _refuse_what_does_not_fit(found, record, current, plan)
    upgrade = plan.price.amount >= current.price.amount
    async with found.pool.acquire() as conn:
        changes = await count_billing_change(conn, record.id)
    asked_at = datetime.now(UTC)
    try:
        info = await found.provider.change_price(
            record.stripe_subscription_id,
            plan,
            upgrade=upgrade,
            idempotency_key=f"lookout-{record.id}-plan-{plan.name}-{changes}",
        )
    except SubscriptionAlreadyCanceled:
        raise APIError(
            409, "already_canceled", "This subscription has ended in Stripe already."
        ) from None
    except PaymentProviderError as exc:
        raise APIError(
            503,
            "payment_provider_unavailable",
            "Stripe did not answer; your plan did not change. Try again in a moment.",
            headers={"Retry-After": "5"},
        ) from exc
    # Stripe's answer names the new price: the subscription follows it, and its resource with
    # a `resize`, as it follows a change made in the Customer Portal (or the webhook of this
    # one, whichever comes first: the newer view of Stripe wins, the other changes nothing).
    updated = await found.lifecycle.apply_stripe_state(
        record.id, StripeState.fetched(info, asked_at), source="api.change_plan"
    )
    return JSONResponse(subscription_json(updated or record))


async def _refuse_what_does_not_fit(
    found: Services, record: SubscriptionRecord, current: Plan, plan: Plan
) -> None:
    """409 with the reason when the resource's use now is more than `plan` allows, or when
    the customer holds as many of `plan` as it allows."""
    held: int = await found.pool.fetchval(
        "SELECT count(*) FROM subscriptions WHERE user_id = $1 AND plan = $2"
        " AND status = ANY($3::text[])",
        record.user_id,
        plan.name,
        list(HOLDING),
    )
    refusal = plan_limit_refusal(plan, held)
    if refusal is not None:
        raise APIError(409, "plan_limit_reached", refusal)
    noun = _NOUNS.get(record.resource_type, record.resource_type)
    limit = plan.limits.max_connections
    if limit < current.limits.max_connections:
        try:
            open_now = await found.runner.open_connections(record.resource_id, record.resource_type)
        except Exception as exc:  # the server does not answer: cannot tell, so do not shrink
            logger.warning("sessions of %s not counted (%s)", record.resource_id, exc)
            raise APIError(
                503,
                "usage_unknown",
                f"Your {noun}'s current use could not be measured; try again in a moment.",
                headers={"Retry-After": "5"},
            ) from None
        if open_now is not None and open_now > limit:
            raise APIError(
                409,
                "downgrade_does_not_fit",
                f"Your {noun} has {open_now} connections open and {plan.display_name} allows"
                f" {limit} at once; close {open_now - limit} of them, then change plan again.",
            )
    storage_mb = plan.limits.storage_mb
    if storage_mb is not None and storage_mb < (current.limits.storage_mb or 0):
        size = (await found.metrics.storage.read()).get(record.resource_id)
        if size is not None and size > storage_mb * 1024 * 1024:
            raise APIError(
                409,
                "downgrade_does_not_fit",
                f"Your {noun} uses {size // (1024 * 1024)} MB and {plan.display_name} includes"
                f" {storage_mb} MB; delete some data, then change plan again.",
            )


plan_routes = [
    Route("/v1/subscriptions/{subscription_id}", change_plan, methods=["PATCH"]),
    Route(
        "/v1/subscriptions/{subscription_id}/credentials",
        subscription_credentials,
        methods=["POST"],
    ),
]
