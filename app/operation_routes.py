"""The operation routes: snapshot, cancel, and a graph's credentials."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.auth import authenticate
from app.billing.subscriptions import (
    ACTIVE_RESOURCE_STATUSES,
    SubscriptionRecord,
    get_subscription_by_resource,
)
from app.errors import APIError
from app.services import services
from app.users import User
from provisioning import (
    OperationNotCancellable,
    OperationNotFound,
    OperationRecord,
    ResourceNotFound,
    get_operation,
)

__all__ = ["operation_routes", "owned_graph", "owned_operation"]


async def owned_operation(request: Request, user: User, operation_id: str) -> OperationRecord:
    async with services(request).pool.acquire() as conn:
        operation = await get_operation(conn, operation_id)
    if operation is None or operation.user_id != user.id:
        raise APIError(404, "not_found", f"There is no operation {operation_id} of yours.")
    return operation


async def owned_graph(request: Request, user: User, graph_id: str) -> SubscriptionRecord:
    """The subscription of the user's graph ``graph_id``; 404 for anyone else's or none."""
    async with services(request).pool.acquire() as conn:
        record = await get_subscription_by_resource(conn, graph_id)
    if record is None or record.user_id != user.id or record.resource_type != "graph":
        raise APIError(404, "not_found", f"There is no graph {graph_id} of yours.")
    return record


async def operation(request: Request) -> Response:
    user = await authenticate(request)
    found = await owned_operation(request, user, request.path_params["operation_id"])
    return JSONResponse(found.snapshot())


async def cancel_operation(request: Request) -> Response:
    user = await authenticate(request)
    found = await owned_operation(request, user, request.path_params["operation_id"])
    try:
        after = await services(request).runner.cancel(found.id)
    except OperationNotCancellable as exc:
        raise APIError(409, "not_cancellable", str(exc).capitalize() + ".") from None
    except OperationNotFound:
        raise APIError(404, "not_found", f"There is no operation {found.id} of yours.") from None
    return JSONResponse(after.snapshot(), status_code=200 if after.is_terminal else 202)


async def graph_credentials(request: Request) -> Response:
    user = await authenticate(request)
    graph_id = request.path_params["graph_id"]
    record = await owned_graph(request, user, graph_id)
    if record.status not in ACTIVE_RESOURCE_STATUSES:
        raise APIError(
            409,
            "graph_not_ready",
            f"The graph is {record.status.replace('_', ' ')}; credentials exist once it is active.",
        )
    try:
        credentials = await services(request).runner.rotate_credentials(graph_id)
    except ResourceNotFound:
        raise APIError(
            409, "graph_not_ready", "The graph's database is not ready; try again shortly."
        ) from None
    return JSONResponse(credentials.as_json(), headers={"Cache-Control": "no-store"})


operation_routes = [
    Route("/v1/operations/{operation_id}", operation, methods=["GET"]),
    Route("/v1/operations/{operation_id}", cancel_operation, methods=["DELETE"]),
    Route("/v1/graphs/{graph_id}/credentials", graph_credentials, methods=["POST"]),
]
