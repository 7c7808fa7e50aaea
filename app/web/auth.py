"""Who is asking: a Bearer API key, or for EventSource (no headers) a signed `?token=`."""

from __future__ import annotations

from starlette.requests import Request

from app.users import KeyHolder, User, holder_of_api_key, looks_like_api_key
from app.web.errors import APIError
from app.web.ratelimit import category_for
from app.web.services import services

__all__ = ["authenticate", "authenticate_key", "bearer_key", "client_ip", "count_request"]


def bearer_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def count_request(request: Request, category: str, identity: str) -> None:
    """Counts the request against its rate limit; raises 429 when over it."""
    allowance = await services(request).rate_limits.check(category, identity)
    if allowance is not None:
        request.state.rate_limit = allowance


async def authenticate(request: Request) -> User:
    return (await authenticate_key(request)).user


async def authenticate_key(request: Request) -> KeyHolder:
    """The user and which of their keys signed the request (streams and tokens keep the key's
    id, so that revoking the key ends them too)."""
    key = bearer_key(request)
    if key is None:
        await count_request(request, "anonymous", client_ip(request))
        raise APIError(
            401,
            "unauthorized",
            "Send your API key as 'Authorization: Bearer <key>'"
            " (`lookout users create EMAIL` makes one).",
            headers={"WWW-Authenticate": "Bearer"},
        )
    # An address that has sent too many bad keys is refused before its key is looked up: a
    # guesser rotating keys must not cost a database query each.
    services(request).rate_limits.refuse_if_full("bad_keys", client_ip(request))
    holder = None
    if looks_like_api_key(key):
        async with services(request).pool.acquire() as conn:
            holder = await holder_of_api_key(conn, key)
    if holder is None:
        await count_request(request, "bad_keys", client_ip(request))
        raise APIError(
            401,
            "invalid_api_key",
            "This API key is not valid or was revoked; check it or create a new one.",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    request.state.user = holder.user
    await count_request(request, category_for(request.method, request.url.path), holder.user.id)
    return holder
