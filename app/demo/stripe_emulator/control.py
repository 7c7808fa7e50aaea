"""`/_emulator/...`: JSON controls for tests and the demo (never part of Stripe).

Open when the emulator has no `control_key` (tests); with one (`lookout demo`), every control
asks for it as Stripe asks for a secret key (`Authorization: Bearer <key>`, or Basic with the
key as user name), since a page in the user's browser could otherwise forge payments.

Actions answer `{"object": <the changed object>, "events": [{"id", "type"}, ...]}`; each takes
an optional JSON body, where `"deliver_webhooks": false` records the events without delivering
them (release them later with `POST /_emulator/webhooks/release`).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from app.demo.stripe_emulator import flows
from app.demo.stripe_emulator.api import api_key_of
from app.demo.stripe_emulator.errors import StripeError
from app.demo.stripe_emulator.state import EmulatorState, Fault, Obj
from app.demo.stripe_emulator.webhooks import WebhookDispatcher

Action = Callable[[flows.Emit, str, Obj], Obj]
_OUTCOMES = ("paid", "failed", "action_required")


async def _body(request: Request) -> Obj:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise StripeError.invalid(f"The body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise StripeError.invalid("The body must be a JSON object.")
    return body


def _error(exc: StripeError) -> JSONResponse:
    return JSONResponse(exc.body("control"), exc.status)


CONTROL_PREFIX = "/_emulator/"


class RequireControlKey:
    """ASGI middleware of the emulator: any path under `/_emulator/` (the controls there now
    and any added later) answers 401 without `key`."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # Mounted (as in the demo), the path still carries the mount's prefix.
            path, root = scope["path"], scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root) :]
            if path.startswith(CONTROL_PREFIX):
                given = api_key_of(Request(scope))
                if given is None or not hmac.compare_digest(given.encode(), self.key):
                    error = StripeError(
                        401,
                        "The emulator's controls need its secret key: send it as"
                        " 'Authorization: Bearer <key>' (lookout demo: STRIPE_API_KEY, or the"
                        " stripe_api_key file of LOOKOUT_DATA_DIR).",
                    )
                    await _error(error)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def control_routes(state: EmulatorState, webhooks: WebhookDispatcher) -> list[Route]:
    def action(fn: Action) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                body = await _body(request)
                deliver = bool(body.get("deliver_webhooks", True))
                emitted: list[Obj] = []

                def emit(event_type: str, obj: Obj, previous: Obj | None = None) -> Obj:
                    evt = webhooks.emit(event_type, obj, previous=previous, deliver=deliver)
                    emitted.append({"id": evt["id"], "type": event_type})
                    return evt

                obj = fn(emit, request.path_params["id"], body)
            except StripeError as exc:
                return _error(exc)
            return JSONResponse({"object": obj, "events": emitted})

        return endpoint

    def pay(emit: flows.Emit, sid: str, body: Obj) -> Obj:
        return flows.complete_checkout(
            state, emit, sid, email=body.get("email"), async_payment=bool(body.get("async_payment"))
        )

    def async_payment(emit: flows.Emit, sid: str, body: Obj) -> Obj:
        return flows.async_payment_result(
            state, emit, sid, succeeded=bool(body.get("succeeded", True))
        )

    def expire(emit: flows.Emit, sid: str, body: Obj) -> Obj:
        return flows.expire_checkout(state, emit, sid)

    def portal_cancel(emit: flows.Emit, sub_id: str, body: Obj) -> Obj:
        if not body.get("at_period_end", True):
            return flows.cancel_now(state, emit, sub_id)
        # As the Customer Portal does in flexible billing mode: `cancel_at` only.
        sub = state.get("subscription", sub_id)
        flows.refuse_ended(sub, "canceled")
        details: Obj = {k: body[k] for k in ("comment", "feedback") if k in body}
        end = flows.resolve_cancel_at(state, sub, "min_period_end")
        return flows.set_cancel_at(state, emit, sub, end, details=details)

    def portal_reactivate(emit: flows.Emit, sub_id: str, body: Obj) -> Obj:
        sub = state.get("subscription", sub_id)
        flows.refuse_ended(sub, "reactivated")
        return flows.set_cancel_at(state, emit, sub, None)

    def renew(emit: flows.Emit, sub_id: str, body: Obj) -> Obj:
        outcome = body.get("outcome", "paid")
        if outcome not in _OUTCOMES:
            raise StripeError.invalid(f"outcome must be one of {', '.join(_OUTCOMES)}")
        return flows.renew(state, emit, sub_id, outcome=str(outcome))

    def pay_invoice(emit: flows.Emit, sub_id: str, body: Obj) -> Obj:
        return flows.pay_latest_invoice(state, emit, sub_id)

    def set_status(emit: flows.Emit, sub_id: str, body: Obj) -> Obj:
        status = body.get("status")
        if not isinstance(status, str):
            raise StripeError.missing("status")
        return flows.set_status(state, emit, sub_id, status)

    def payment_method(emit: flows.Emit, customer_id: str, body: Obj) -> Obj:
        return flows.attach_payment_method(
            state, emit, customer_id, outcome=str(body.get("card", "succeeds")),
            default=bool(body.get("default", True)),
        )  # fmt: skip

    def fail_refund(emit: flows.Emit, refund_id: str, body: Obj) -> Obj:
        reason = str(body.get("reason", "expired_or_canceled_card"))
        return flows.fail_refund(state, emit, refund_id, reason=reason)

    async def requests(request: Request) -> Response:
        if request.method == "DELETE":
            state.requests.clear()
            return JSONResponse({"data": []})
        method, path = request.query_params.get("method"), request.query_params.get("path")
        rows = [
            r.as_json()
            for r in state.requests
            if (method is None or r.method == method.upper()) and (path is None or r.path == path)
        ]
        return JSONResponse({"data": rows})

    async def events(request: Request) -> Response:
        return JSONResponse({"data": webhooks.summary()})

    async def event(request: Request) -> Response:
        eid = request.path_params["id"]
        try:
            evt = state.get("event", eid)
        except StripeError as exc:
            return _error(exc)
        if request.method == "POST":
            return JSONResponse(await webhooks.deliver_now(eid))
        return JSONResponse({"event": evt, **webhooks.deliveries[eid].as_json(evt)})

    async def webhook_config(request: Request) -> Response:
        try:
            body = await _body(request)
        except StripeError as exc:
            return _error(exc)
        if request.method == "PUT":
            webhooks.url = body.get("url", webhooks.url)
            secrets: Any = body.get("secrets")
            if isinstance(secrets, list) and secrets and all(isinstance(s, str) for s in secrets):
                webhooks.secrets = list(secrets)
        waiting = sum(d.state != "delivered" for d in webhooks.deliveries.values())
        return JSONResponse(
            {"url": webhooks.url, "paused": webhooks.paused, "undelivered": waiting}
        )

    async def webhook_command(request: Request) -> Response:
        command = request.path_params["command"]
        try:
            body = await _body(request)
        except StripeError as exc:
            return _error(exc)
        if command == "pause":
            webhooks.pause()
        elif command == "resume":
            webhooks.resume()
        elif command == "release":
            return JSONResponse({"released": webhooks.release_held()})
        elif command == "drain":
            drained = await webhooks.drain(float(body.get("timeout", 10.0)))
            return JSONResponse({"drained": drained}, 200 if drained else 504)
        else:
            return JSONResponse({"error": {"message": f"unknown command {command}"}}, 404)
        return JSONResponse({"paused": webhooks.paused})

    async def faults(request: Request) -> Response:
        if request.method == "DELETE":
            state.faults.clear()
            return JSONResponse({"data": []})
        body = await _body(request)
        fault = Fault(
            method=str(body.get("method", "*")).upper(),
            path_prefix=str(body.get("path", "/v1/")),
            status=int(body.get("status", 500)),
            remaining=int(body.get("count", 1)),
            delay=float(body.get("delay", 0.0)),
        )
        if fault.status == 429:
            fault.error_type, fault.message = "invalid_request_error", "Too many requests."
        state.faults.append(fault)
        return JSONResponse({"data": [vars(f) for f in state.faults]})

    post = ["POST"]
    return [
        Route("/_emulator/checkout/{id}/pay", action(pay), methods=post),
        Route("/_emulator/checkout/{id}/async_payment", action(async_payment), methods=post),
        Route("/_emulator/checkout/{id}/expire", action(expire), methods=post),
        Route("/_emulator/subscriptions/{id}/portal_cancel", action(portal_cancel), methods=post),
        Route(
            "/_emulator/subscriptions/{id}/portal_reactivate",
            action(portal_reactivate),
            methods=post,
        ),
        Route("/_emulator/subscriptions/{id}/renew", action(renew), methods=post),
        Route("/_emulator/subscriptions/{id}/pay_invoice", action(pay_invoice), methods=post),
        Route("/_emulator/subscriptions/{id}/status", action(set_status), methods=post),
        Route("/_emulator/customers/{id}/payment_method", action(payment_method), methods=post),
        Route("/_emulator/refunds/{id}/fail", action(fail_refund), methods=post),
        Route("/_emulator/requests", requests, methods=["GET", "DELETE"]),
        Route("/_emulator/events", events, methods=["GET"]),
        Route("/_emulator/events/{id}", event, methods=["GET"]),
        Route("/_emulator/events/{id}/deliver", event, methods=post),
        Route("/_emulator/webhooks", webhook_config, methods=["GET", "PUT"]),
        Route("/_emulator/webhooks/{command}", webhook_command, methods=post),
        Route("/_emulator/faults", faults, methods=["POST", "DELETE"]),
    ]
