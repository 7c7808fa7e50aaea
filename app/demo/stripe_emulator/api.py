"""What every call of the emulated `/v1` API goes through: authentication, the form body,
the request log, injected faults, `Idempotency-Key`, `expand[]` and Stripe's error answers.

Handlers are synchronous on purpose: each one changes the state without yielding to the event
loop, so concurrent calls (five processes creating the same price) are serialised like Stripe's
idempotency layer serialises them.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import anyio
from starlette.requests import Request
from starlette.responses import Response

from app.demo.stripe_emulator import objects
from app.demo.stripe_emulator.errors import StripeError
from app.demo.stripe_emulator.forms import as_list, parse_pairs
from app.demo.stripe_emulator.state import EmulatorState, Obj, RequestRecord, SavedResponse
from app.demo.stripe_emulator.webhooks import WebhookDispatcher

logger = logging.getLogger(__name__)

_NO_KEY = (
    "You did not provide an API key. You need to provide your API key in the Authorization "
    "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See "
    "https://stripe.com/docs/api#authentication for details, or we can help at "
    "https://support.stripe.com/."
)


@dataclass
class ApiContext:
    state: EmulatorState
    webhooks: WebhookDispatcher
    params: Obj
    path_params: dict[str, str]
    request_id: str
    idempotency_key: str | None

    def emit(self, event_type: str, obj: Obj, previous: Obj | None = None) -> Obj:
        """An event caused by this API request (its `request` names the request)."""
        return self.webhooks.emit(
            event_type,
            obj,
            previous=previous,
            request_id=self.request_id,
            idempotency_key=self.idempotency_key,
        )


Handler = Callable[[ApiContext], Obj]
Endpoint = Callable[[Request], Awaitable[Response]]


def _json(status: int, body: Obj, headers: dict[str, str]) -> Response:
    return Response(
        json.dumps(body, indent=2), status, headers=headers, media_type="application/json"
    )


def api_key_of(request: Request) -> str | None:
    """The secret key of a request, sent as Stripe's clients send it (Bearer or Basic)."""
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if scheme.lower() == "basic" and value.strip():
        try:
            return base64.b64decode(value.strip()).decode().split(":", 1)[0] or None
        except ValueError:
            return None
    return None


def expand(state: EmulatorState, obj: Any, path: list[str]) -> Any:
    """Replace ids by objects along a dotted `expand[]` path (`data.` walks a list)."""
    if not path:
        return obj
    if isinstance(obj, list):
        return [expand(state, item, path) for item in obj]
    if not isinstance(obj, dict):
        return obj
    head, rest = path[0], path[1:]
    value = obj.get(head)
    if isinstance(value, str):
        found = state.find(value)
        if found is None:
            return obj
        value = copy.deepcopy(found)
    obj[head] = expand(state, value, rest)
    return obj


def api_endpoint(state: EmulatorState, webhooks: WebhookDispatcher, handler: Handler) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        request_id = objects.stripe_id("req", 14)
        version = request.headers.get("stripe-version") or state.api_version
        headers = {"Request-Id": request_id, "Stripe-Version": version}
        raw = (await request.body()).decode() if request.method == "POST" else request.url.query
        form = parse_qsl(raw, keep_blank_values=True)
        method, path = request.method, request.url.path
        idem = request.headers.get("idempotency-key")
        record = RequestRecord(
            request_id, method, path, idem, {}, form,
            request.headers.get("stripe-version"), state.clock(),
        )  # fmt: skip
        state.requests.append(record)
        if idem and method == "POST":
            headers["Idempotency-Key"] = idem
        try:
            api_key = api_key_of(request)
            if api_key is None:
                raise StripeError(401, _NO_KEY)
            if state.api_key is not None and api_key != state.api_key:
                raise StripeError(401, f"Invalid API Key provided: {api_key[:8]}****{api_key[-4:]}")
            params = parse_pairs(form)
            record.params = params
            fault = state.take_fault(method, path)
            if fault is not None and fault.delay > 0:
                await anyio.sleep(fault.delay)
            if fault is not None and fault.status >= 400:
                headers["Stripe-Should-Retry"] = "true"
                raise StripeError(fault.status, fault.message, type=fault.error_type)
            # Stripe ignores Idempotency-Key on GET and DELETE: they are idempotent already.
            key = (api_key, idem) if idem and method == "POST" else None
            saved = state.idempotency.get(key) if key else None
            if saved is not None:
                if (saved.method, saved.path, saved.params) != (method, path, params):
                    raise StripeError(
                        400,
                        "Keys for idempotent requests can only be used with the same parameters "
                        f"they were first used with. Try using a key other than '{idem}' if you "
                        "meant to execute a different request.",
                        type="idempotency_error",
                    )
                record.status, record.replayed = saved.status, True
                headers.update(
                    {"Idempotent-Replayed": "true", "Original-Request": saved.request_id}
                )
                return Response(saved.body, saved.status, headers, media_type="application/json")
            ctx = ApiContext(state, webhooks, params, dict(request.path_params), request_id, idem)
            result = copy.deepcopy(handler(ctx))
            for expansion in as_list(params.get("expand"), "expand"):
                result = expand(state, result, str(expansion).split("."))
            body = json.dumps(result, indent=2).encode()
            if key is not None:
                state.idempotency[key] = SavedResponse(method, path, params, 200, body, request_id)
            record.status = 200
            return Response(body, 200, headers, media_type="application/json")
        except StripeError as exc:
            record.status = exc.status
            return _json(exc.status, exc.body(request_id), headers)
        except Exception:  # a bug of the emulator: answer as Stripe would, keep the trace
            logger.exception("emulator failed on %s %s", method, path)
            record.status = 500
            error = StripeError(500, "An unknown error occurred in the emulator.", type="api_error")
            return _json(500, error.body(request_id), headers)

    return endpoint
