"""The operation routes: snapshot, cancel, and a graph's credentials."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.billing.subscriptions import (
    ACTIVE_RESOURCE_STATUSES,
)
from app.web.auth import authenticate
from app.web.errors import APIError
from app.web.owned import owned_graph, owned_operation
from app.web.services import services
from provisioning import (
    OperationNotCancellable,
    OperationNotFound,
    ResourceNotFound,
)

__all__ = ["operation_routes"]


async def operation(request: Request) -> Response:
    user = await authenticate(request)
    found = await owned_operation(request, user.id, request.path_params["operation_id"])
    return JSONResponse(found.snapshot())


async def cancel_operation(request: Request) -> Response:
    user = await authenticate(request)
    found = await owned_operation(request, user.id, request.path_params["operation_id"])
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
    record = await owned_graph(request, user.id, graph_id)
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
