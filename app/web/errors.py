"""Every error answer is `{"error": {"code", "message"}}` with a fitting 4xx/5xx status."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.billing.errors import (
    TRANSIENT_ERRORS,
    BillingRefusal,
    CheckoutUnavailable,
    PaymentRequired,
    WebhookRejected,
    is_transient,
)

__all__ = [
    "APIError",
    "client_gone",
    "error_response",
    "exception_handlers",
    "refusal_response",
]

logger = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    503: "unavailable",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc.status, exc.code, exc.message, exc.headers)


def refusal_response(exc: BillingRefusal) -> JSONResponse:
    """Billing's refusals keep their code and message; which status each gets is decided here."""
    headers: dict[str, str] = {}
    if isinstance(exc, WebhookRejected):
        status = 400
    elif isinstance(exc, PaymentRequired):
        status = 402
    elif isinstance(exc, CheckoutUnavailable):
        status = 503
        headers["Retry-After"] = str(exc.retry_after_seconds)
    else:
        status = 409  # the request conflicts with what the user already holds
    return error_response(status, exc.code, exc.message, headers)


async def _billing_refusal(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BillingRefusal)
    return refusal_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        message = f"There is no {request.url.path}; see the API reference in docs/API.md."
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}."
        headers["Allow"] = ", ".join(_allowed_methods(request))
    else:
        message = str(exc.detail)
    code = _HTTP_CODES.get(exc.status_code, "error")
    return error_response(exc.status_code, code, message, headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every method of every route on this path: Starlette's own 405 names only those of the
    first route that matched, so a path served by two routes (GET and DELETE of
    /v1/operations/{id}) would deny the other's existence."""
    methods: set[str] = set()
    for route in getattr(request.app, "routes", ()):
        if isinstance(route, Route) and route.methods and route.path_regex.match(request.url.path):
            methods |= route.methods
    return sorted(methods)


def client_gone(request: Request) -> Response:
    """The client left before its body arrived (or it missed the body's deadline): not an
    error of ours. The answer is for no one; it only ends the request."""
    logger.info("client went away during %s %s", request.method, request.url.path)
    return error_response(400, "client_disconnected", "The request's body did not arrive.")


async def _client_gone(request: Request, exc: Exception) -> Response:
    return client_gone(request)


async def _unavailable(request: Request, exc: Exception) -> Response:
    """PostgreSQL, Redis or Stripe is away (a dropped connection, a restart): not a bug, and
    a 503 with Retry-After tells every client, browsers included, to come back."""
    logger.warning(
        "%s %s: a server it needs is unavailable (%s: %s)",
        request.method,
        request.url.path,
        type(exc).__name__,
        exc,
    )
    return error_response(
        503,
        "unavailable",
        "A server Lookout depends on is not answering; try again in a few seconds.",
        {"Retry-After": "2"},
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    if is_transient(exc):  # a group of them, from a task group
        return await _unavailable(request, exc)
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "Something went wrong on our side; try again.")


exception_handlers = {
    APIError: _api_error,
    BillingRefusal: _billing_refusal,
    HTTPException: _http_error,
    ClientDisconnect: _client_gone,
    # Answered inside the routes' exception middleware, where Starlette does not re-raise
    # them to the server as it does with the catch-all below.
    **{error: _unavailable for error in TRANSIENT_ERRORS},
    Exception: _unexpected,
}
