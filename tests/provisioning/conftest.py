"""Fixtures of the provisioning tests, on the lead's database, Redis and server fixtures."""

from __future__ import annotations

import functools
import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest
from redis.asyncio import Redis

from provisioning import TERMINAL_EVENT_TYPES, GraphBackend
from streams import EventPublisher
from tests.provisioning.support import RecordingHooks, Serving, drop_server_objects, running


@pytest.fixture
async def name_prefix(pg_admin_dsn: str) -> AsyncIterator[str]:
    """A prefix for every database and role this test creates; all of them are dropped after."""
    prefix = f"lkt{secrets.token_hex(4)}_"
    yield prefix
    await drop_server_objects(pg_admin_dsn, prefix)


@pytest.fixture
async def second_prefix(name_prefix: str, second_pg_dsn: str) -> AsyncIterator[str]:
    """``name_prefix``, whose objects are dropped from the second server too."""
    yield name_prefix
    await drop_server_objects(second_pg_dsn, name_prefix)


@pytest.fixture
def graph_backend(pg_admin_dsn: str, name_prefix: str) -> GraphBackend:
    return GraphBackend(pg_admin_dsn, name_prefix=name_prefix)


@pytest.fixture
def hooks() -> RecordingHooks:
    return RecordingHooks()


@pytest.fixture
def publisher(redis: Redis, redis_prefix: str) -> EventPublisher:
    return EventPublisher(redis, prefix=redis_prefix, terminal_types=TERMINAL_EVENT_TYPES)


@pytest.fixture
def serving(db_pool: asyncpg.Pool, publisher: EventPublisher, hooks: RecordingHooks) -> Serving:
    """A runner of this test's pool, publisher and hooks, serving for the duration of a block:
    ``async with serving([backend], lease_seconds=30) as runner``."""
    return functools.partial(running, db_pool, publisher, hooks)


@pytest.fixture
async def user_id(db_pool: asyncpg.Pool) -> str:
    user = f"usr_{secrets.token_hex(12)}"
    await db_pool.execute(
        "INSERT INTO users (id, email) VALUES ($1, $2)", user, f"{user}@example.test"
    )
    return user
