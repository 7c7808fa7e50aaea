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
from app.demo.stripe_emulator.state import EmulatorState, Fault, Obj, RequestRecord, SavedResponse
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


# Ids of objects the emulator does not keep (payment methods, charges...): expandable in
# Stripe, left as ids here.
_FOREIGN_IDS = ("pm_", "pi_", "ch_", "re_", "card_", "src_", "txn_", "bpc_", "acct_", "cn_")
_MAX_EXPAND_DEPTH = 4


def _not_expandable(full: str) -> StripeError:
    return StripeError.invalid(f"This property cannot be expanded ({full}).", param="expand")


def expand(state: EmulatorState, obj: Any, path: list[str], full: str = "") -> Any:
    """Replace ids by objects along a dotted `expand[]` path (`data.` walks a list). A path
    that names no expandable property is refused, as Stripe refuses it."""
    full = full or ".".join(path)
    if len(full.split(".")) > _MAX_EXPAND_DEPTH:
        raise StripeError.invalid(
            f"You cannot expand more than {_MAX_EXPAND_DEPTH} levels of a property ({full}).",
            param="expand",
        )
    if not path or obj is None:
        return obj
    if isinstance(obj, list):
        return [expand(state, item, path, full) for item in obj]
    if not isinstance(obj, dict) or path[0] not in obj:
        raise _not_expandable(full)
    head, rest = path[0], path[1:]
    value = obj[head]
    if isinstance(value, str):
        found = state.find(value)
        if found is None:
            if not value.startswith(_FOREIGN_IDS):
                raise _not_expandable(full)
            return obj
        value = copy.deepcopy(found)
    elif value is not None and not rest and not (isinstance(value, dict) and "id" in value):
        raise _not_expandable(full)  # a scalar, a hash or a list: nothing to expand
    obj[head] = expand(state, value, rest, full)
    return obj


def _saves(exc: StripeError) -> bool:
    """Stripe saves an error answer under its idempotency key once the endpoint began
    executing; a request refused by parameter validation never began, and may be retried."""
    return not (exc.code or "").startswith("parameter_")


async def _execute(
    ctx: ApiContext, handler: Handler, record: RequestRecord, key: tuple[str, str] | None,
    fault: Fault | None, headers: dict[str, str],
) -> Response:  # fmt: skip
    """Runs the handler with `key` held in flight, and saves its answer for replays: a result,
    an error raised while executing, a 500. An injected fault strikes before execution (as a
    429 or a load balancer's 5xx at Stripe would): nothing is saved, a retry may succeed."""
    state = ctx.state
    if key is not None:
        state.in_flight.add(key)
    try:
        if fault is not None and fault.delay > 0:
            await anyio.sleep(fault.delay)
        if fault is not None and fault.status >= 400:
            headers["Stripe-Should-Retry"] = "true"
            raise StripeError(fault.status, fault.message, type=fault.error_type)
        saved = True
        try:
            result = copy.deepcopy(handler(ctx))
            for expansion in as_list(ctx.params.get("expand"), "expand"):
                result = expand(state, result, str(expansion).split("."), str(expansion))
            status, body = 200, json.dumps(result, indent=2).encode()
        except StripeError as exc:
            saved = _saves(exc)
            status, body = exc.status, json.dumps(exc.body(record.request_id), indent=2).encode()
        except Exception:  # a bug of the emulator: answer as Stripe would, keep the trace
            logger.exception("emulator failed on %s %s", record.method, record.path)
            error = StripeError(500, "An unknown error occurred in the emulator.", type="api_error")
            status, body = 500, json.dumps(error.body(record.request_id), indent=2).encode()
    finally:
        if key is not None:
            state.in_flight.discard(key)
    if key is not None and saved:
        state.idempotency[key] = SavedResponse(
            record.method, record.path, ctx.params, status, body, record.request_id
        )
    record.status = status
    return Response(body, status, headers, media_type="application/json")


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
            if key is not None and key in state.in_flight:
                # Nothing is saved for the loser: it may retry once the first one has answered.
                headers["Stripe-Should-Retry"] = "true"
                raise StripeError(
                    409,
                    f"There is currently another in-progress request using this Idempotent Key "
                    f"(that probably means you submitted twice, and the other request is still "
                    f"going through): {idem}. Please try again later.",
                    code="idempotency_key_in_use",
                )
            ctx = ApiContext(state, webhooks, params, dict(request.path_params), request_id, idem)
            return await _execute(ctx, handler, record, key, fault, headers)
        except StripeError as exc:
            record.status = exc.status
            return _json(exc.status, exc.body(request_id), headers)
        except Exception:  # a bug of the emulator: answer as Stripe would, keep the trace
            logger.exception("emulator failed on %s %s", method, path)
            record.status = 500
            error = StripeError(500, "An unknown error occurred in the emulator.", type="api_error")
            return _json(500, error.body(request_id), headers)

    return endpoint
