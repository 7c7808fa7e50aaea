"""Stand-ins for the fixtures of tests/conftest.py, to run the streams tests on their own
(``pytest --confcutdir=tests/streams -p tests.streams.standalone tests/streams``) against the
Redis of ``REDIS_URL`` or the machine's own, while the rest of the app is being built."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from tests.support.redis_cluster import LocalCluster, local_cluster


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def redis_url() -> str:
    return os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # Nothing kept on disk: no test of this one restarts a node (those make their own).
    with local_cluster(tmp_path_factory.mktemp("redis-cluster"), persistence="none") as cluster:
        yield cluster


@pytest.fixture
def redis_prefix() -> str:
    return f"lookout-test-{secrets.token_hex(4)}:"


@pytest.fixture
async def redis(redis_url: str, redis_prefix: str) -> AsyncIterator[Redis]:
    # Not flushed: the machine's server may be shared; every key here is under redis_prefix.
    client = Redis.from_url(redis_url)
    yield client
    keys = [key async for key in client.scan_iter(match=f"{redis_prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()
