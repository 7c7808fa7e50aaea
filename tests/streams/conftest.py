"""Fixtures of the streams tests: a hub and a publisher on the lead's ``redis`` fixture, and a
small Starlette app serving the two kinds of streams over a real uvicorn socket."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette

from streams import EventPublisher
from streams.hub import EventHub
from streams.sse import StreamOptions
from tests.streams.support import Snapshots, make_app
from tests.streams.vocabulary import TERMINAL_TYPES


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
