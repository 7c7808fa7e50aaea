"""What several streams tests share: snapshots as the app would read them, and a small Starlette
app serving the two kinds of streams."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from streams.hub import EventHub
from streams.sse import EventStreamResponse, StreamOptions, last_event_id
from streams.topics import operation_topic
from tests.streams.vocabulary import FINAL_STATUSES

__all__ = ["Snapshots", "make_app"]


class Snapshots:
    """What the app would read from PostgreSQL: one snapshot per topic."""

    def __init__(self) -> None:
        self.by_topic: dict[str, Mapping[str, Any]] = {}
        self.asked: list[str] = []

    async def __call__(self, topic: str) -> Mapping[str, Any]:
        self.asked.append(topic)
        return self.by_topic.get(topic, {"status": "running"})


def make_app(hub: EventHub, snapshots: Snapshots, options: StreamOptions) -> Starlette:
    options = replace(options, final_statuses=FINAL_STATUSES)

    async def operation_events(request: Request) -> Response:
        op_id = request.path_params["op_id"]
        position = last_event_id(request.scope)
        if await hub.history.is_fully_delivered(operation_topic(op_id), position):
            return Response(status_code=204)
        return EventStreamResponse.for_operation(
            hub, op_id, last_event_id=position, snapshot=snapshots, options=options
        )

    async def user_events(request: Request) -> Response:
        return EventStreamResponse.for_user(
            hub,
            request.path_params["user_id"],
            last_event_id=last_event_id(request.scope),
            snapshot=snapshots,
            options=options,
        )

    app = Starlette(
        routes=[
            Route("/ops/{op_id}/events", operation_events),
            Route("/users/{user_id}/events", user_events),
        ]
    )
    app.state.begin_shutdown = hub.close
    return app
