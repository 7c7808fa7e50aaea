"""`create_emulator`: the Starlette app that stands in for Stripe in the demo and the tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.demo.stripe_emulator import api_billing as billing
from app.demo.stripe_emulator import api_catalog as catalog
from app.demo.stripe_emulator import api_payments as payments
from app.demo.stripe_emulator import portal
from app.demo.stripe_emulator.api import Handler, api_endpoint
from app.demo.stripe_emulator.checkout_page import checkout_routes
from app.demo.stripe_emulator.control import RequireControlKey, control_routes
from app.demo.stripe_emulator.errors import StripeError
from app.demo.stripe_emulator.state import EmulatorState
from app.demo.stripe_emulator.webhooks import WebhookDispatcher

__all__ = ["API_VERSION", "Emulator", "create_emulator"]

# The version the emulator answers in and stamps on events: the one stripe 16.x pins.
API_VERSION = "2026-10-28.endive"

_API: list[tuple[str, str, Handler]] = [
    ("POST", "/v1/customers", catalog.create_customer),
    ("GET", "/v1/customers/{id}", catalog.retrieve_customer),
    ("POST", "/v1/products", catalog.create_product),
    ("GET", "/v1/products", catalog.list_products),
    ("GET", "/v1/products/search", catalog.search_products),
    ("GET", "/v1/products/{id}", catalog.retrieve_product),
    ("POST", "/v1/prices", catalog.create_price),
    ("GET", "/v1/prices", catalog.list_prices),
    ("GET", "/v1/prices/{id}", catalog.retrieve_price),
    ("POST", "/v1/checkout/sessions", billing.create_session),
    ("GET", "/v1/checkout/sessions", billing.list_sessions),
    ("GET", "/v1/checkout/sessions/{id}", billing.retrieve_session),
    ("GET", "/v1/checkout/sessions/{id}/line_items", billing.session_line_items),
    ("POST", "/v1/checkout/sessions/{id}/expire", billing.expire_session),
    ("GET", "/v1/subscriptions", billing.list_subscriptions),
    ("POST", "/v1/subscriptions", billing.create_subscription),
    ("GET", "/v1/subscriptions/{id}", billing.retrieve_subscription),
    ("POST", "/v1/subscriptions/{id}", billing.update_subscription),
    ("DELETE", "/v1/subscriptions/{id}", billing.cancel_subscription),
    ("GET", "/v1/invoices", billing.list_invoices),
    ("GET", "/v1/invoices/{id}", billing.retrieve_invoice),
    ("POST", "/v1/billing_portal/sessions", portal.create_portal_session),
    ("GET", "/v1/events", billing.list_events),
    ("GET", "/v1/events/{id}", billing.retrieve_event),
    # payments and refunds
    ("GET", "/v1/payment_intents/{id}", payments.retrieve_payment_intent),
    ("GET", "/v1/charges", payments.list_charges),
    ("GET", "/v1/charges/{id}", payments.retrieve_charge),
    ("GET", "/v1/invoice_payments", payments.list_invoice_payments),
    ("GET", "/v1/invoice_payments/{id}", payments.retrieve_invoice_payment),
    ("POST", "/v1/refunds", payments.create_refund),
    ("GET", "/v1/refunds", payments.list_refunds),
    ("GET", "/v1/refunds/{id}", payments.retrieve_refund),
]


@dataclass
class Emulator:
    """What `app.state.emulator` holds, for in-process use (tests, `lookout demo`)."""

    state: EmulatorState
    webhooks: WebhookDispatcher


def create_emulator(
    *,
    webhook_url: str | None,
    webhook_secret: str,
    public_url: str,
    api_key: str | None = None,
    webhook_retry_base: float = 1.0,
    webhook_max_attempts: int | None = None,
    webhook_shuffle_seed: int | None = None,
    webhook_max_delay: float = 0.0,
    control_key: str | None = None,
) -> Starlette:
    """A fresh emulator with its own in-memory state.

    `public_url` is where browsers reach it (Checkout Session `url`s point there);
    `api_key`, when given, is the only secret key accepted; webhooks that fail are retried on
    Stripe's three-day schedule, compressed so that `webhook_retry_base` seconds stand for its
    first minute (`webhook_max_attempts`, when given, cuts it short). With
    `webhook_shuffle_seed`, each delivery waits up to `webhook_max_delay` seconds, so events
    arrive late and out of order as Stripe allows (see `webhooks`).
    `control_key`, when given, is asked for by every `/_emulator/` control.
    """
    state = EmulatorState(
        api_version=API_VERSION, public_url=public_url.rstrip("/"), api_key=api_key
    )
    webhooks = WebhookDispatcher(
        state,
        url=webhook_url,
        secret=webhook_secret,
        retry_base=webhook_retry_base,
        max_attempts=webhook_max_attempts,
        shuffle_seed=webhook_shuffle_seed,
        max_delay=webhook_max_delay,
    )
    routes = [
        Route(path, api_endpoint(state, webhooks, handler), methods=[method])
        for method, path, handler in _API
    ]

    async def unknown(request: Request) -> Response:
        error = StripeError(
            404,
            f"Unrecognized request URL ({request.method}: {request.url.path}).",
        )
        return JSONResponse(error.body("req_unknown"), 404)

    routes.append(Route("/v1/{rest:path}", unknown, methods=["GET", "POST", "DELETE"]))
    routes += checkout_routes(state, webhooks)
    routes += control_routes(state, webhooks)
    routes += portal.portal_routes(state, webhooks)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await webhooks.aclose()

    middleware = [] if control_key is None else [Middleware(RequireControlKey, key=control_key)]
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware)
    app.state.emulator = Emulator(state, webhooks)
    return app
