"""Fixtures of the streams tests: a hub and a publisher on the lead's ``redis`` fixture, and a
small Starlette app serving the two kinds of streams over a real uvicorn socket."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from typing import Any

import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from streams import EventPublisher
from streams.hub import EventHub
from streams.sse import EventStreamResponse, StreamOptions, last_event_id
from streams.topics import operation_topic
from tests.streams.vocabulary import FINAL_STATUSES, TERMINAL_TYPES


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


@pytest.fixture
def snapshots() -> Snapshots:
    return Snapshots()


@pytest.fixture
def stream_options() -> StreamOptions:
    return StreamOptions(keepalive_seconds=15.0, retry_ms=1000, max_seconds=None)


@pytest.fixture
async def hub(redis: Redis, redis_prefix: str) -> AsyncIterator[EventHub]:
    name = f"hub-{secrets.token_hex(4)}"
    async with EventHub(
        redis, prefix=redis_prefix, tick_seconds=0.05, name=name, terminal_types=TERMINAL_TYPES
    ) as hub:
        await hub.wait_connected()
        yield hub


@pytest.fixture
def publisher(redis: Redis, redis_prefix: str) -> EventPublisher:
    return EventPublisher(redis, prefix=redis_prefix, terminal_types=TERMINAL_TYPES)


@pytest.fixture
def app(hub: EventHub, snapshots: Snapshots, stream_options: StreamOptions) -> Starlette:
    return make_app(hub, snapshots, stream_options)
