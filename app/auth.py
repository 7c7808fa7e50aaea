"""Who is asking: a Bearer API key, or for EventSource (no headers) a signed `?token=`."""

from __future__ import annotations

from starlette.requests import Request

from app.errors import APIError
from app.services import services
from app.users import User, user_for_api_key

__all__ = ["authenticate", "bearer_key"]


def bearer_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


async def authenticate(request: Request) -> User:
    key = bearer_key(request)
    if key is None:
        raise APIError(
            401,
            "unauthorized",
            "Send your API key as 'Authorization: Bearer <key>'"
            " (`lookout users create EMAIL` makes one).",
            headers={"WWW-Authenticate": "Bearer"},
        )
    async with services(request).pool.acquire() as conn:
        user = await user_for_api_key(conn, key)
    if user is None:
        raise APIError(
            401,
            "invalid_api_key",
            "This API key is not valid; check it or create a new one.",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    request.state.user = user
    return user
