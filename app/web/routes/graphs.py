"""The graph routes: `POST /v1/graphs/{graph_id}/credentials` (a new password, shown once) and
`GET /v1/graphs/{graph_id}/usage` (how much of its plan a graph uses, as measured)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.billing.plans import get_plan
from app.billing.subscriptions import ACTIVE_RESOURCE_STATUSES
from app.web.auth import authenticate
from app.web.errors import APIError
from app.web.owned import owned_graph
from app.web.services import services
from provisioning import ResourceNotFound
from streams import isoformat_z

__all__ = ["graph_routes"]


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


async def graph_usage(request: Request) -> Response:
    """The graph's database size (measured at most once a minute, null until measured or
    while the server cannot be reached), beside the plan's enforced limits and its soft,
    measured-only allowances."""
    user = await authenticate(request)
    graph_id = request.path_params["graph_id"]
    record = await owned_graph(request, user.id, graph_id)
    found = services(request)
    plan = get_plan(record.plan)
    sizes = await found.metrics.storage.read()
    measured_at = found.metrics.storage.measured_at
    return JSONResponse(
        {
            "graph_id": graph_id,
            "database_bytes": sizes.get(graph_id),
            "measured_at": isoformat_z(measured_at) if measured_at else None,
            "limits": plan.limits.as_json(),
            "soft_limits": plan.limits.soft_json(),
        }
    )


graph_routes = [
    Route("/v1/graphs/{graph_id}/credentials", graph_credentials, methods=["POST"]),
    Route("/v1/graphs/{graph_id}/usage", graph_usage, methods=["GET"]),
]
