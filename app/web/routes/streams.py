"""The SSE routes: an operation's events, a user's events, and the tokens EventSource needs.

The two streams are served ahead of the app's middleware (`streams.DirectRoutes`): every frame
would otherwise pass through three middleware coroutines per client, which costs memory and
tail latency at thousands of streams (bench/streams_fanout.py). So they answer their own
errors; the token route is an ordinary one.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import asyncpg
from redis.exceptions import RedisError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from app.billing.errors import BillingRefusal
from app.billing.subscriptions import list_subscriptions
from app.billing.updates import subscription_json
from app.web.auth import authenticate_key, bearer_key, client_ip, count_request
from app.web.errors import APIError, client_gone, error_response, refusal_response
from app.web.owned import owned_operation
from app.web.services import services
from provisioning import TERMINAL_STATUSES, get_operation
from streams import (
    AccessCheck,
    EventStreamResponse,
    InvalidStreamToken,
    LeaseSource,
    ReconnectLater,
    StreamHandler,
    StreamLease,
    StreamOptions,
    StreamRefused,
    TooManyStreams,
    isoformat_z,
    last_event_id,
    operation_topic,
)

__all__ = ["answering_errors", "direct_stream_routes", "stream_routes"]

logger = logging.getLogger(__name__)

STREAM_TOKEN_SECONDS = 300.0
EXPIRED_HISTORY_POSITION = "0-1"


# Redis or PostgreSQL cannot be reached (down, restarting, out of connections, timed out).
_OUTAGE: tuple[type[BaseException], ...] = (
    RedisError,
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,  # the connection went away under the query
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.InternalClientError,  # a terminated backend's pooled connection
)


def answering_errors(
    handler: Callable[[Request], Awaitable[Response]], *, reconnect_on_outage: bool = False
) -> StreamHandler:
    """Outside the middleware, a handler turns its own errors into the contract's answers.

    ``reconnect_on_outage`` (the streams): a server that cannot be reached as the stream opens
    answers what makes every EventSource reconnect, where a 500 would make it give up for good.
    """
    outage = _OUTAGE if reconnect_on_outage else ()

    async def run(request: Request) -> ASGIApp:
        try:
            return await handler(request)
        except APIError as exc:
            return error_response(exc.status, exc.code, exc.message, exc.headers)
        except BillingRefusal as exc:
            return refusal_response(exc)
        except ClientDisconnect:
            return client_gone(request)
        except outage as exc:
            logger.warning("no stream on %s for now: %r", request.url.path, exc)
            return ReconnectLater()
        except Exception:
            logger.exception("unhandled error on %s", request.url.path)
            return error_response(500, "internal_error", "Something went wrong on our side.")

    return run


@dataclass(frozen=True, slots=True)
class Listener:
    """Who opened a stream, and the API key it was opened with (directly, or through a stream
    token issued on it): the stream ends when that key is revoked."""

    user_id: str
    key_id: str

    def access_check(self, request: Request) -> AccessCheck:
        status = services(request).key_status
        key_id = self.key_id

        async def still_allowed() -> bool:
            return await status.active(key_id)

        return still_allowed


async def _refuse_token(request: Request, message: str) -> NoReturn:
    await count_request(request, "anonymous", client_ip(request))
    raise APIError(401, "invalid_token", message)


async def stream_listener(request: Request) -> Listener:
    """The Bearer key when there is one, else the signed `?token=` of EventSource."""
    token = request.query_params.get("token")
    if bearer_key(request) is not None or token is None:
        holder = await authenticate_key(request)
        return Listener(holder.user.id, holder.key_id)
    found = services(request)
    try:
        grant = found.tokens.grant(token)
    except InvalidStreamToken as exc:
        await _refuse_token(request, f"{exc}; get a new one from POST /v1/stream-tokens")
    if grant.credential is None:  # issued before tokens named their key
        await _refuse_token(request, "outdated stream token; get a new one from /v1/stream-tokens")
    assert grant.credential is not None
    if not await found.key_status.active(grant.credential):
        await _refuse_token(
            request,
            "the API key this stream token was issued on was revoked; sign in with a valid key",
        )
    await count_request(request, "streams", grant.user_id)
    return Listener(grant.user_id, grant.credential)


def _lease(request: Request, user_id: str) -> LeaseSource:
    """Taken by the stream itself as it starts, so that it is given back however it ends."""
    leases = services(request).leases

    async def take() -> StreamLease:
        try:
            return await leases.acquire(user_id)
        except TooManyStreams as exc:
            refusal = error_response(
                429,
                "too_many_streams",
                f"You have {exc.limit} event streams open, the most allowed; close one first.",
                headers={"Retry-After": str(exc.retry_after)},
            )
            raise StreamRefused(refusal, str(exc)) from None

    return take


def _options(request: Request) -> StreamOptions:
    settings = services(request).settings
    return StreamOptions(
        max_seconds=float(settings.max_stream_seconds),
        recheck_seconds=settings.access_recheck_seconds,
        final_statuses=frozenset(TERMINAL_STATUSES),
    )


async def operation_events(request: Request) -> Response:
    listener = await stream_listener(request)
    user_id = listener.user_id
    found = services(request)
    op_id = request.path_params["operation_id"]
    operation = await owned_operation(request, user_id, op_id)
    position = last_event_id(request.scope)
    topic = operation_topic(op_id)
    if await found.hub.history.is_fully_delivered(topic, position):
        return Response(status_code=204)
    if position is None and operation.is_terminal and await found.hub.history.head(topic) is None:
        # Its history has expired: a position before any kept event makes the stream say so
        # (`stream.reset` with the snapshot) and end, instead of waiting for nothing.
        position = EXPIRED_HISTORY_POSITION

    async def snapshot(topic: str) -> Mapping[str, Any]:
        async with found.pool.acquire() as conn:
            current = await get_operation(conn, op_id)
        # `GET /v1/operations/{id}`'s body: a terminal `status` also ends the stream.
        return {**(current.snapshot() if current else {}), "operation_id": op_id}

    return EventStreamResponse.for_operation(
        found.hub,
        op_id,
        last_event_id=position,
        snapshot=snapshot,
        options=_options(request),
        take_lease=_lease(request, user_id),
        still_allowed=listener.access_check(request),
    )


async def user_events(request: Request) -> Response:
    listener = await stream_listener(request)
    user_id = listener.user_id
    found = services(request)

    async def snapshot(topic: str) -> Mapping[str, Any]:
        async with found.pool.acquire() as conn:
            records = await list_subscriptions(conn, user_id)
        return {"subscriptions": [subscription_json(r) for r in records]}

    return EventStreamResponse.for_user(
        found.hub,
        user_id,
        last_event_id=last_event_id(request.scope),
        snapshot=snapshot,
        options=_options(request),
        take_lease=_lease(request, user_id),
        still_allowed=listener.access_check(request),
    )


async def stream_tokens(request: Request) -> Response:
    holder = await authenticate_key(request)
    # Bound to the key: revoking it withdraws the token too (checked as a stream opens).
    token, expires_at = services(request).tokens.issue(
        holder.user.id, STREAM_TOKEN_SECONDS, credential=holder.key_id
    )
    return JSONResponse(
        {"token": token, "expires_at": isoformat_z(expires_at)},
        status_code=201,
        headers={"Cache-Control": "no-store"},
    )


direct_stream_routes: list[tuple[str, StreamHandler]] = [
    (
        "/v1/operations/{operation_id}/events",
        answering_errors(operation_events, reconnect_on_outage=True),
    ),
    ("/v1/events", answering_errors(user_events, reconnect_on_outage=True)),
]
stream_routes = [
    # Reached only by methods other than GET (a 405), since GET is served directly.
    Route("/v1/operations/{operation_id}/events", operation_events, methods=["GET"]),
    Route("/v1/events", user_events, methods=["GET"]),
    Route("/v1/stream-tokens", stream_tokens, methods=["POST"]),
]
