"""The service's Redis client gives up on a Redis that stops answering, rather than hang."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.application import REDIS_SOCKET_TIMEOUT_SECONDS, redis_client
from streams import PackedConnection
from tests.support.redis_server import redis_process

pytestmark = pytest.mark.anyio


@pytest.mark.timeout(120)
async def test_a_paused_redis_is_an_error_not_a_hang(tmp_path: Path) -> None:
    with redis_process(tmp_path / "redis") as server:
        client = redis_client(server.url)
        assert isinstance(client, Redis)
        # Explicit: older redis-py (5.x) had no read timeout by default and waited forever.
        assert client.connection_pool.connection_kwargs["socket_timeout"] == 5.0
        # Commands packed by hiredis (streams.connection): a quarter of the publisher's CPU.
        assert client.connection_pool.connection_class is PackedConnection
        try:
            await server.wait_ready()
            assert await client.ping()
            server.pause()  # up, connected, and silent
            try:
                started = anyio.current_time()
                # redis-py retries a timed-out command a few times before it gives up.
                with anyio.fail_after(60), pytest.raises(RedisError):
                    await client.set("k", "v")
                assert anyio.current_time() - started >= REDIS_SOCKET_TIMEOUT_SECONDS
            finally:
                server.resume()
            await server.wait_ready()
            assert await client.set("k", "v")
        finally:
            await client.aclose()
