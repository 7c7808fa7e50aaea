"""The OpenAPI 3.1 document of the public HTTP API, served at `GET /openapi.json`.

Written here by hand, route by route, from the contract (docs/API.md), rather than derived
from the handlers: the handlers are plain Starlette functions that carry no schema, and the
document is a promise to clients that should change only on purpose. tests/api checks that
every route the app mounts is described here and fuzzes the live server against it
(schemathesis), so the two cannot drift apart silently.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Final

from app.billing.checkout import RESOURCE_NAME
from app.billing.plans import PLANS

__all__ = ["EVENT_TYPES", "openapi_document"]

Schema = dict[str, Any]

SUBSCRIPTION_STATUSES: Final = [
    "pending_payment",
    "provisioning",
    "active",
    "past_due",
    "unpaid",
    "paused",
    "canceled",
    "failed",
    "expired",
]
OPERATION_KINDS: Final = ["provision", "deprovision", "resize", "suspend", "resume"]
OPERATION_STATUSES: Final = ["pending", "running", "waiting", "completed", "failed", "cancelled"]
# The `event:` of every SSE event, and what its `data` carries besides `type` and `ts`.
EVENT_TYPES: Final[dict[str, str]] = {
    "operation.started": "`operation_id`, `step` (null), `progress` 0, `message`",
    "operation.progress": "`operation_id`, `step`, `progress` (0-100, never decreasing), `message`",
    "operation.waiting": "`operation_id`, `step`, `progress`, `message`, `retry_at`: the "
    "provisioning server does not answer and is waited out",
    "operation.completed": "`operation_id`, `progress` 100, `result`",
    "operation.failed": "`operation_id`, `error`: a sentence for the customer",
    "operation.cancelled": "`operation_id`",
    "subscription.updated": "`subscription_id`, `subscription`: the object "
    "`GET /v1/subscriptions/{id}` answers",
    "invoice.updated": "`subscription_id`, `invoice`: as `GET /v1/invoices` lists it",
    "stream.reset": "the history asked for is no longer kept (or `Last-Event-ID` is ahead of "
    "it): the current snapshot instead",
}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _object(required: dict[str, Schema], optional: dict[str, Schema] | None = None) -> Schema:
    """An object with these properties; more may be added later, so others are allowed."""
    return {
        "type": "object",
        "required": list(required),
        "properties": {**required, **(optional or {})},
    }


def _list_of(name: str) -> Schema:
    return _object({"data": {"type": "array", "items": _ref(name)}})


TIME: Final[Schema] = {"type": "string", "format": "date-time"}
STRING: Final[Schema] = {"type": "string"}
INTEGER: Final[Schema] = {"type": "integer"}
BOOLEAN: Final[Schema] = {"type": "boolean"}
PROGRESS: Final[Schema] = {"type": "integer", "minimum": 0, "maximum": 100}

SCHEMAS: Final[dict[str, Schema]] = {
    "Error": _object(
        {
            "error": _object(
                {
                    "code": {**STRING, "description": "stable, machine-readable"},
                    "message": {**STRING, "description": "a sentence for a person"},
                }
            )
        }
    ),
    "Price": _object(
        {
            "amount": {**INTEGER, "description": "in the currency's minor units"},
            "currency": STRING,
            "interval": STRING,
        }
    ),
    "Plan": _object(
        {
            "name": STRING,
            "display_name": STRING,
            "resource_type": {"enum": ["graph", "repository"]},
            "price": _ref("Price"),
        },
        {
            "description": STRING,
            "limits": {
                **_object({}, {"max_per_user": INTEGER, "max_connections": INTEGER}),
                "description": "every number here is enforced",
            },
            "soft_limits": {
                **_object({}, {"storage_mb": INTEGER}),
                "description": "measured and shown, not enforced",
            },
        },
    ),
    "PlanList": _list_of("Plan"),
    "CheckoutRequest": _object(
        {
            "plan": {"type": "string", "enum": list(PLANS)},
            "resource_name": {"type": "string", "pattern": f"^{RESOURCE_NAME.pattern}$"},
        }
    ),
    "CheckoutCreated": _object(
        {
            "subscription_id": STRING,
            "checkout_session_id": STRING,
            "checkout_url": {**STRING, "format": "uri"},
            "status": {"const": "pending_payment"},
        }
    ),
    "CheckoutStatus": _object(
        {
            "status": {"enum": SUBSCRIPTION_STATUSES},
            "subscription_id": STRING,
            "operation_id": _nullable(STRING),
            "events_url": {
                **STRING,
                "format": "uri",
                "description": "the operation's stream once there is one, else /v1/events",
            },
        }
    ),
    "Refund": _object(
        {"amount": INTEGER, "currency": STRING, "status": STRING},
    ),
    "Subscription": _object(
        {
            "id": STRING,
            "status": {"enum": SUBSCRIPTION_STATUSES},
            "plan": STRING,
            "plan_display_name": STRING,
            "resource_type": {"enum": ["graph", "repository"]},
            "resource_id": STRING,
            "cancel_at_period_end": {
                **BOOLEAN,
                "description": "true whenever Stripe has a cancellation scheduled",
            },
            "current_period_end": _nullable(TIME),
            "operation_id": _nullable(STRING),
            "cancel_at": _nullable(TIME),
            "refund": {
                **_nullable(_ref("Refund")),
                "description": "set when a failed provisioning was refunded",
            },
        },
        {
            "resource_name": STRING,
            "created_at": TIME,
            "updated_at": TIME,
        },
    ),
    "SubscriptionList": _list_of("Subscription"),
    "PlanChange": _object({"plan": {"type": "string", "enum": list(PLANS)}}),
    "Credentials": _object(
        {
            "host": STRING,
            "port": INTEGER,
            "database": STRING,
            "user": STRING,
            "password": STRING,
            "dsn": STRING,
        },
    ),
    "PortalSession": _object({"url": {**STRING, "format": "uri"}}),
    "Invoice": _object(
        {
            "id": STRING,
            "number": _nullable(STRING),
            "status": _nullable(STRING),
            "amount_due": INTEGER,
            "amount_paid": INTEGER,
            "currency": STRING,
            "period_start": _nullable(TIME),
            "period_end": _nullable(TIME),
            "hosted_invoice_url": _nullable(STRING),
            "subscription_id": _nullable(STRING),
        }
    ),
    "InvoiceList": _list_of("Invoice"),
    "Operation": _object(
        {
            "id": STRING,
            "kind": {"enum": OPERATION_KINDS},
            "status": {"enum": OPERATION_STATUSES},
            "progress": PROGRESS,
            "step": _nullable(STRING),
            "error": {
                **_nullable(STRING),
                "description": "a sentence for the customer, never a traceback or a DSN",
            },
            "result": _nullable({"type": "object"}),
        }
    ),
    "StreamToken": _object({"token": STRING, "expires_at": TIME}),
    "ApiKey": _object(
        {
            "id": STRING,
            "created_at": TIME,
            "last_used_at": _nullable(TIME),
            "revoked_at": _nullable(TIME),
        }
    ),
    "ApiKeyCreated": {
        "allOf": [
            _ref("ApiKey"),
            _object({"key": {**STRING, "description": "shown this once only"}}),
        ]
    },
    "ApiKeyList": _list_of("ApiKey"),
    "GraphUsage": _object(
        {
            "graph_id": STRING,
            "database_bytes": _nullable(INTEGER),
            "measured_at": _nullable(TIME),
            "limits": {"type": "object"},
            "soft_limits": {"type": "object"},
        }
    ),
    # pid and worker: which process answered (`lookout serve --workers N` runs several).
    "Health": _object({"status": STRING}, {"pid": INTEGER, "worker": INTEGER}),
    "Unhealthy": {
        "allOf": [
            _ref("Error"),
            _object(
                {"status": {"const": "unavailable"}},
                {
                    "failing_tasks": {"type": "array", "items": {"type": "object"}},
                    "pid": INTEGER,
                    "worker": INTEGER,
                },
            ),
        ]
    },
    "WebhookReceived": _object({"received": {"const": True}, "id": STRING, "duplicate": BOOLEAN}),
    "StripeEvent": _object(
        {"id": STRING, "object": {"const": "event"}, "type": STRING, "data": {"type": "object"}}
    ),
    "ServerSentEvent": {
        **_object(
            {
                "id": {**STRING, "description": "opaque, distinct within the stream"},
                "event": {"enum": list(EVENT_TYPES)},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": _ref("StreamEvent"),
                },
            },
            {"retry": {"type": "integer", "minimum": 0}},
        ),
        "description": "One event of a stream, as a client's parser assembles its fields.",
    },
    "StreamEvent": {
        **_object(
            {"type": {"enum": list(EVENT_TYPES)}, "ts": TIME},
            {
                "operation_id": STRING,
                "subscription_id": STRING,
                "kind": {"enum": OPERATION_KINDS},
                "resource_type": {"enum": ["graph", "repository"]},
                "resource_id": STRING,
                "step": _nullable(STRING),
                "progress": PROGRESS,
                "message": _nullable(STRING),
                "retry_at": TIME,
                "error": STRING,
                "result": _nullable({"type": "object"}),
                "subscription": _ref("Subscription"),
                "invoice": _ref("Invoice"),
            },
        ),
        "description": "The `data:` line of every SSE event, as JSON.",
    },
}

ERROR_MEANINGS: Final[dict[int, str]] = {
    400: "The request is not valid; the message says what to change.",
    401: "No API key, or not a valid one (`WWW-Authenticate` says which).",
    402: "A payment method is needed first.",
    404: "There is no such thing, or it is another user's.",
    409: "Not possible in the current state; the message says why.",
    413: "The body is too large.",
    415: "The body is not `application/json`.",
    429: "Too many requests or open streams; `Retry-After` says when to try again.",
    503: "A server Lookout needs did not answer; nothing changed. Retry after `Retry-After`.",
}
_RETRY_AFTER: Final[Schema] = {
    "Retry-After": {
        "description": "seconds to wait before retrying",
        "schema": {"type": "string"},
    }
}
_JSON_BODY_ERRORS: Final = (400, 413, 415)
# Authenticated routes are rate limited per user and category.
_AUTH_ERRORS: Final = (401, 429)


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(status: int, meaning: str | None = None) -> Schema:
    response = _json(_ref("Error"), meaning or ERROR_MEANINGS[status])
    if status in (429, 503):
        response["headers"] = copy.deepcopy(_RETRY_AFTER)
    return response


def _path_id(name: str, what: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": STRING, "description": what}


_STREAM_PARAMETERS: Final[list[Schema]] = [
    {
        "name": "Last-Event-ID",
        "in": "header",
        "required": False,
        "schema": STRING,
        "description": "resume after this event, with no gap and no duplicate",
    },
    {
        "name": "last_event_id",
        "in": "query",
        "required": False,
        "schema": STRING,
        "description": "as `Last-Event-ID`, for clients that cannot send headers",
    },
]


def _stream(description: str) -> Schema:
    events = "\n".join(f"- `{name}`: {carries}" for name, carries in EVENT_TYPES.items())
    return {
        "description": (
            f"{description}\n\nEach event is `id:` (opaque, distinct within the stream), "
            "`event:` (its type) and one `data:` line of JSON (the StreamEvent schema); the "
            "stream begins with `retry:` and a comment line keeps it alive at least every "
            f"15 s. Event types:\n\n{events}"
        ),
        "headers": {
            "Cache-Control": {"schema": {"type": "string"}, "description": "no-cache"},
        },
        # One event: what a client's parser (EventSource) hands over, as OpenAPI 3.2's
        # `itemSchema` has it and as schemathesis reads it.
        "content": {"text/event-stream": {"schema": _ref("ServerSentEvent")}},
    }


def _operation(
    summary: str,
    responses: dict[int, Schema],
    *,
    errors: tuple[int, ...] = (),
    auth: str | None = "bearer",
    parameters: list[Schema] | None = None,
    body: Schema | None = None,
    description: str | None = None,
) -> Schema:
    """One operation; `errors` are the statuses that answer the error body."""
    every_error = set(errors)
    if auth is not None:
        every_error |= set(_AUTH_ERRORS)
    if body is not None:
        every_error |= set(_JSON_BODY_ERRORS)
    answers: dict[str, Schema] = {str(status): r for status, r in sorted(responses.items())}
    for status in sorted(every_error):
        answers[str(status)] = _error(status)
    if auth is not None and "401" in answers:
        answers["401"]["headers"] = {
            "WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}
        }
    found: Schema = {"summary": summary, "responses": answers}
    if description:
        found["description"] = description
    found["security"] = {
        "bearer": [{"apiKey": []}],
        "stream": [{"apiKey": []}, {"streamToken": []}],
        None: [],
    }[auth]
    if parameters:
        found["parameters"] = parameters
    if body is not None:
        found["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": body}},
        }
    return found


_SUBSCRIPTION_ID: Final = _path_id("subscription_id", "the subscription's id (`sub_…`)")
_GRAPH_ID: Final = _path_id("graph_id", "the graph's id (`gr_…`)")
_OPERATION_ID: Final = _path_id("operation_id", "the operation's id (`op_…`)")
_SUBSCRIPTION_OK: Final = {200: _json(_ref("Subscription"), "The subscription.")}
_CREDENTIALS_OK: Final = {
    200: {
        **_json(_ref("Credentials"), "The new login, shown this once only."),
        "headers": {"Cache-Control": {"schema": {"type": "string"}, "description": "no-store"}},
    }
}
_HTML: Final = {200: {"description": "HTML", "content": {"text/html": {"schema": STRING}}}}

PATHS: Final[dict[str, dict[str, Schema]]] = {
    "/": {"get": _operation("The dashboard", _HTML, auth=None)},
    "/checkout/return": {
        "get": _operation(
            "The page Stripe Checkout returns to; it follows the operation's stream",
            _HTML,
            auth=None,
        )
    },
    "/static/{path}": {
        "get": _operation(
            "The dashboard's scripts, styles and icons",
            {200: {"description": "the file", "content": {"*/*": {"schema": STRING}}}},
            errors=(404,),
            auth=None,
            parameters=[_path_id("path", "the file's name")],
        )
    },
    "/healthz": {
        "get": _operation(
            "Liveness",
            {
                200: _json(_ref("Health"), "Alive."),
                503: _json(_ref("Unhealthy"), "A background task of the process is crash-looping."),
            },
            auth=None,
        )
    },
    "/readyz": {
        "get": _operation(
            "Readiness",
            {
                200: _json(_ref("Health"), "PostgreSQL and Redis answer; no task is failing."),
                503: _json(
                    _ref("Unhealthy"), "PostgreSQL or Redis does not answer, or a task fails."
                ),
            },
            auth=None,
        )
    },
    "/metrics": {
        "get": {
            **_operation(
                "Prometheus metrics",
                {200: {"description": "text", "content": {"text/plain": {"schema": STRING}}}},
                errors=(401,),
                auth=None,
                description="Open unless `LOOKOUT_METRICS_TOKEN` is set; then it asks for "
                "`Authorization: Bearer <token>`.",
            ),
            "security": [{}, {"metricsToken": []}],
        }
    },
    "/openapi.json": {
        "get": _operation(
            "This document",
            {200: _json({"type": "object"}, "OpenAPI 3.1.")},
            auth=None,
        )
    },
    "/v1/plans": {
        "get": _operation(
            "The plan catalog",
            {200: _json(_ref("PlanList"), "Every plan.")},
            auth=None,
        )
    },
    "/v1/checkout": {
        "post": _operation(
            "Start a Stripe Checkout for a plan",
            {201: _json(_ref("CheckoutCreated"), "Send the customer to `checkout_url` to pay.")},
            errors=(409, 503),
            body=_ref("CheckoutRequest"),
            description="The Checkout Session's `metadata` and `subscription_data.metadata` "
            "carry `lookout_subscription_id`. 409: the name is taken or the plan's "
            "`max_per_user` is reached.",
        )
    },
    "/v1/checkout/{checkout_session_id}": {
        "get": _operation(
            "Where a checkout stands",
            {200: _json(_ref("CheckoutStatus"), "The checkout's subscription.")},
            errors=(404, 503),
            parameters=[_path_id("checkout_session_id", "Stripe's Checkout Session id")],
            description="Confirms the payment with Stripe itself when the webhook has not "
            "arrived yet (it can only move a subscription forward).",
        )
    },
    "/v1/webhooks/stripe": {
        "post": _operation(
            "Stripe's webhooks",
            {200: _json(_ref("WebhookReceived"), "Durably stored (also when seen before).")},
            errors=(400, 413, 503),
            auth=None,
            parameters=[
                {
                    "name": "Stripe-Signature",
                    "in": "header",
                    "required": True,
                    "schema": STRING,
                    "description": "`t=…,v1=…` signed with a secret of STRIPE_WEBHOOK_SECRET",
                }
            ],
            body=_ref("StripeEvent"),
            description="No API key: the signature is the authentication. A missing, invalid "
            "or stale (over 300 s) signature, or a body that is not a JSON Stripe event, "
            "answers 400; a body over 1 MiB, 413; nothing is stored for a refused delivery. "
            "An event that could not be stored answers 503 (Stripe retries), never 2xx.",
        )
    },
    "/v1/subscriptions": {
        "get": _operation(
            "The user's subscriptions",
            {200: _json(_ref("SubscriptionList"), "Newest first.")},
        ),
        "post": _operation(
            "Subscribe with the saved default payment method, without Checkout",
            {201: _json(_ref("Subscription"), "Created; `provisioning` follows on payment.")},
            errors=(402, 409, 503),
            body=_ref("CheckoutRequest"),
            description="402 `payment_method_required` when the customer has none (use "
            "`POST /v1/checkout`).",
        ),
    },
    "/v1/subscriptions/{subscription_id}": {
        "get": _operation(
            "One subscription", _SUBSCRIPTION_OK, errors=(404,), parameters=[_SUBSCRIPTION_ID]
        ),
        "patch": _operation(
            "Change plan within the same resource type, in Stripe with proration",
            {200: _json(_ref("Subscription"), "Its `operation_id` is the resize that follows.")},
            errors=(404, 409, 503),
            parameters=[_SUBSCRIPTION_ID],
            body=_ref("PlanChange"),
            description="400: unknown plan, or another resource type. 409 with a reason: "
            "a downgrade that does not fit.",
        ),
    },
    "/v1/subscriptions/{subscription_id}/cancel": {
        "post": _operation(
            "Cancel at the period's end, in Stripe too",
            _SUBSCRIPTION_OK,
            errors=(404, 409, 503),
            parameters=[_SUBSCRIPTION_ID],
        )
    },
    "/v1/subscriptions/{subscription_id}/reactivate": {
        "post": _operation(
            "Undo a scheduled cancellation, in Stripe too",
            _SUBSCRIPTION_OK,
            errors=(404, 409, 503),
            parameters=[_SUBSCRIPTION_ID],
        )
    },
    "/v1/subscriptions/{subscription_id}/credentials": {
        "post": _operation(
            "Rotate the login's password of a graph or repository subscription",
            _CREDENTIALS_OK,
            errors=(404, 409),
            parameters=[_SUBSCRIPTION_ID],
            description="409 while the subscription is not `active`.",
        )
    },
    "/v1/billing/portal": {
        "post": _operation(
            "A Stripe Customer Portal session, returning to the dashboard",
            {201: _json(_ref("PortalSession"), "Send the customer to `url`.")},
            errors=(503,),
        )
    },
    "/v1/invoices": {
        "get": _operation(
            "The user's invoices, from Stripe",
            {200: _json(_ref("InvoiceList"), "Newest first.")},
            errors=(503,),
        )
    },
    "/v1/graphs/{graph_id}/subscription": {
        "get": _operation(
            "The subscription behind a graph",
            _SUBSCRIPTION_OK,
            errors=(404,),
            parameters=[_GRAPH_ID],
        )
    },
    "/v1/graphs/{graph_id}/credentials": {
        "post": _operation(
            "Rotate a graph's database password",
            _CREDENTIALS_OK,
            errors=(404, 409),
            parameters=[_GRAPH_ID],
            description="409 while the graph is not active.",
        )
    },
    "/v1/graphs/{graph_id}/usage": {
        "get": _operation(
            "A graph's measured database size beside its plan's limits",
            {200: _json(_ref("GraphUsage"), "Measured about once a minute.")},
            errors=(404,),
            parameters=[_GRAPH_ID],
        )
    },
    "/v1/operations/{operation_id}": {
        "get": _operation(
            "An operation's snapshot",
            {200: _json(_ref("Operation"), "The operation now.")},
            errors=(404,),
            parameters=[_OPERATION_ID],
        ),
        "delete": _operation(
            "Cancel a running operation (the task really stops)",
            {
                200: _json(_ref("Operation"), "Ended: cancelled, or it had finished."),
                202: _json(_ref("Operation"), "Stopping."),
            },
            errors=(404, 409),
            parameters=[_OPERATION_ID],
        ),
    },
    "/v1/operations/{operation_id}/events": {
        "get": _operation(
            "SSE: one operation's events from its start, then live",
            {
                200: _stream(
                    "The operation's events; the stream closes right after its terminal event."
                ),
                204: {
                    "description": "The operation has finished and `Last-Event-ID` is its "
                    "terminal event: nothing more will come."
                },
            },
            errors=(404, 503),
            auth="stream",
            parameters=[_OPERATION_ID, *_STREAM_PARAMETERS],
        )
    },
    "/v1/events": {
        "get": _operation(
            "SSE: all of the user's events (operations and subscriptions), live",
            {
                200: _stream(
                    "The user's events. Opened without `Last-Event-ID` it asks for no history "
                    "and never begins with `stream.reset`."
                )
            },
            errors=(503,),
            auth="stream",
            parameters=_STREAM_PARAMETERS,
        )
    },
    "/v1/stream-tokens": {
        "post": _operation(
            "A short-lived token for `?token=` (EventSource cannot send headers)",
            {
                201: {
                    **_json(_ref("StreamToken"), "Valid until `expires_at`."),
                    "headers": {
                        "Cache-Control": {"schema": {"type": "string"}, "description": "no-store"}
                    },
                }
            },
        )
    },
    "/v1/api-keys": {
        "get": _operation(
            "The signed-in user's API keys (never the keys themselves)",
            {200: _json(_ref("ApiKeyList"), "Every key, revoked ones included.")},
        ),
        "post": _operation(
            "A new API key",
            {201: _json(_ref("ApiKeyCreated"), "The key itself is shown this once only.")},
        ),
    },
    "/v1/api-keys/{key_id}": {
        "delete": _operation(
            "Revoke an API key",
            {
                204: {
                    "description": "Revoked: refused at once on every instance; its stream "
                    "tokens stop working and its open streams close within 30 s."
                }
            },
            errors=(404,),
            parameters=[_path_id("key_id", "the key's id")],
        )
    },
}


@functools.cache
def _document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Lookout",
            "version": "1",
            "summary": "Stripe Checkout, in-process provisioning and live progress over SSE.",
            "description": (
                'JSON in and out. Errors are `{"error": {"code", "message"}}` with a '
                'fitting 4xx status. Lists answer `{"data": [...]}`; times are ISO 8601 in '
                'UTC; prices are `{"amount" (minor units), "currency", "interval"}`. '
                "Another user's resources answer 404. Server limits apply to every route: "
                "request headers over 16 KiB answer 431, a request that does not arrive in "
                "time 408, and past the concurrency limit new connections get 503. The prose "
                "reference is docs/API.md."
            ),
        },
        "components": {
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`Authorization: Bearer <api key>` "
                    "(`lookout users create EMAIL` prints one)",
                },
                "streamToken": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "token",
                    "description": "for EventSource, which cannot send headers: a token from "
                    "`POST /v1/stream-tokens`",
                },
                "metricsToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`LOOKOUT_METRICS_TOKEN`, when set",
                },
            },
            "schemas": SCHEMAS,
        },
        "paths": PATHS,
    }


def openapi_document(public_url: str) -> dict[str, Any]:
    """The document, with `servers` naming this deployment (LOOKOUT_PUBLIC_URL)."""
    document = copy.deepcopy(_document())
    document["servers"] = [{"url": public_url}]
    return document
