"""Fixtures of the streams tests: Redis, a hub and a publisher, and a small Starlette app
serving the two kinds of streams over a real uvicorn socket.

Every test that uses Redis runs twice: on the single Redis of the other tests ("single") and
on a local Redis Cluster of three primaries ("cluster", started once per session), where keys
are hash-tagged per topic and pub/sub is sharded.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette

from streams import EventPublisher, RedisClient
from streams.hub import EventHub
from streams.sse import StreamOptions
from tests.streams.either_redis import RedisMode, connect
from tests.streams.support import Snapshots, make_app
from tests.streams.vocabulary import TERMINAL_TYPES


@pytest.fixture(params=["single", "cluster"])
def redis_mode(request: pytest.FixtureRequest) -> RedisMode:
    mode: RedisMode = request.param
    return mode


@pytest.fixture
async def redis(
    redis: Redis, redis_mode: RedisMode, request: pytest.FixtureRequest
) -> AsyncIterator[RedisClient]:
    """The single Redis of the other tests, or a client of the session's cluster (flushed)."""
    if redis_mode == "single":
        yield redis
        return
    client = connect(request.getfixturevalue("redis_cluster").url, "cluster")
    await client.flushdb()  # on every primary
    yield client
    await client.aclose()


@pytest.fixture
async def new_redis(
    redis_url: str, redis_mode: RedisMode, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., RedisClient]]:
    """Makes more clients of this run's Redis (another instance's, or other options)."""
    if redis_mode == "cluster":
        redis_url = request.getfixturevalue("redis_cluster").url
    made: list[RedisClient] = []

    def make(**options: Any) -> RedisClient:
        made.append(connect(redis_url, redis_mode, **options))
        return made[-1]

    yield make
    for client in made:
        await client.aclose()


@pytest.fixture
def snapshots() -> Snapshots:
    return Snapshots()


@pytest.fixture
def stream_options() -> StreamOptions:
    return StreamOptions(keepalive_seconds=15.0, retry_ms=1000, max_seconds=None)


@pytest.fixture
async def hub(redis: RedisClient, redis_prefix: str) -> AsyncIterator[EventHub]:
    name = f"hub-{secrets.token_hex(4)}"
    async with EventHub(
        redis, prefix=redis_prefix, tick_seconds=0.05, name=name, terminal_types=TERMINAL_TYPES
    ) as hub:
        await hub.wait_connected()
        yield hub


@pytest.fixture
def publisher(redis: RedisClient, redis_prefix: str) -> EventPublisher:
    return EventPublisher(redis, prefix=redis_prefix, terminal_types=TERMINAL_TYPES)


@pytest.fixture
def app(hub: EventHub, snapshots: Snapshots, stream_options: StreamOptions) -> Starlette:
    return make_app(hub, snapshots, stream_options)
