"""`/v1/api-keys`: the signed-in user's keys; list, create, revoke.

Revoking a key refuses it at once on every instance (each request looks its key up in
PostgreSQL), withdraws the stream tokens issued on it (checked as a stream opens) and ends
its open streams within `Settings.access_recheck_seconds` plus a second. Revoking the key
that signs the request, or the user's last key, is allowed: the operator makes a new one with
`lookout users keys create EMAIL`.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.users import api_key_json, list_api_keys, new_api_key, revoke_api_key
from app.web.auth import authenticate
from app.web.errors import APIError
from app.web.services import services

__all__ = ["key_routes"]

_NO_STORE = {"Cache-Control": "no-store"}


async def api_keys(request: Request) -> Response:
    user = await authenticate(request)
    async with services(request).pool.acquire() as conn:
        records = await list_api_keys(conn, user.id)
    return JSONResponse({"data": [api_key_json(r) for r in records]})


async def create_key(request: Request) -> Response:
    user = await authenticate(request)
    async with services(request).pool.acquire() as conn:
        made = await new_api_key(conn, user.id)
    # The only answer that carries a key: it cannot be read back.
    return JSONResponse(
        {**api_key_json(made.record), "key": made.key}, status_code=201, headers=_NO_STORE
    )


async def revoke_key(request: Request) -> Response:
    user = await authenticate(request)
    key_id = request.path_params["key_id"]
    async with services(request).pool.acquire() as conn:
        revoked = await revoke_api_key(conn, user.id, key_id)
    if revoked is None:
        raise APIError(404, "not_found", "You have no API key with that id.")
    return Response(status_code=204)


key_routes = [
    Route("/v1/api-keys", api_keys, methods=["GET"]),
    Route("/v1/api-keys", create_key, methods=["POST"]),
    Route("/v1/api-keys/{key_id}", revoke_key, methods=["DELETE"]),
]
