"""One ownership check for every route that names a record by id: the user's own, or 404.

A record of someone else answers exactly as a missing one, so an id cannot be probed for
existence."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from starlette.requests import HTTPConnection

from app.billing.subscriptions import (
    SubscriptionRecord,
    get_subscription,
    get_subscription_by_resource,
    get_subscription_by_session,
)
from app.db import Connection
from app.web.errors import APIError
from app.web.services import services
from provisioning import OperationRecord, get_operation

__all__ = ["owned", "owned_checkout", "owned_graph", "owned_operation", "owned_subscription"]


class _Owned(Protocol):
    @property
    def user_id(self) -> str: ...


_Record = TypeVar("_Record", bound=_Owned)


async def owned(
    connection: HTTPConnection,
    user_id: str,
    load: Callable[[Connection], Awaitable[_Record | None]],
    missing: str,
) -> _Record:
    """What `load` finds if it belongs to `user_id`; otherwise a 404 saying `missing`."""
    async with services(connection).pool.acquire() as conn:
        record = await load(conn)
    if record is None or record.user_id != user_id:
        raise APIError(404, "not_found", missing)
    return record


async def owned_operation(
    connection: HTTPConnection, user_id: str, operation_id: str
) -> OperationRecord:
    return await owned(
        connection,
        user_id,
        lambda conn: get_operation(conn, operation_id),
        f"There is no operation {operation_id} of yours.",
    )


async def owned_subscription(
    connection: HTTPConnection, user_id: str, subscription_id: str
) -> SubscriptionRecord:
    return await owned(
        connection,
        user_id,
        lambda conn: get_subscription(conn, subscription_id),
        f"There is no subscription {subscription_id} of yours.",
    )


async def owned_checkout(
    connection: HTTPConnection, user_id: str, session_id: str
) -> SubscriptionRecord:
    # Not repeated back: the return page shows this message, and the id comes from its URL.
    return await owned(
        connection,
        user_id,
        lambda conn: get_subscription_by_session(conn, session_id),
        "There is no such checkout of yours.",
    )


async def owned_graph(
    connection: HTTPConnection, user_id: str, graph_id: str
) -> SubscriptionRecord:
    """The subscription of the user's graph `graph_id` (a repository login is not a graph)."""

    async def graph(conn: Connection) -> SubscriptionRecord | None:
        record = await get_subscription_by_resource(conn, graph_id)
        return record if record is not None and record.resource_type == "graph" else None

    return await owned(connection, user_id, graph, f"There is no graph {graph_id} of yours.")
