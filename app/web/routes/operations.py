"""The operation routes: snapshot and cancel."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.web.auth import authenticate
from app.web.errors import APIError
from app.web.owned import owned_operation
from app.web.services import services
from provisioning import (
    OperationNotCancellable,
    OperationNotFound,
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


operation_routes = [
    Route("/v1/operations/{operation_id}", operation, methods=["GET"]),
    Route("/v1/operations/{operation_id}", cancel_operation, methods=["DELETE"]),
]
