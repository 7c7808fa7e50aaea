"""The service's Redis client gives up on a Redis that stops answering, rather than hang."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import anyio
import pytest
from redis.exceptions import RedisError

from app.application import REDIS_SOCKET_TIMEOUT_SECONDS, redis_client
from tests.streams.test_resilience import start_redis, throwaway_redis, wait_redis

pytestmark = pytest.mark.anyio

__all__ = ["throwaway_redis"]  # a fixture, used by name


@pytest.mark.timeout(120)
async def test_a_paused_redis_is_an_error_not_a_hang(throwaway_redis: tuple[int, Path]) -> None:
    port, data = throwaway_redis
    server = start_redis(port, data)
    client = redis_client(f"redis://127.0.0.1:{port}/0")
    # Explicit: older redis-py (5.x) had no read timeout by default and waited forever.
    assert client.connection_pool.connection_kwargs["socket_timeout"] == 5.0
    try:
        await wait_redis(client)
        os.kill(server.pid, signal.SIGSTOP)  # up, connected, and silent
        try:
            started = anyio.current_time()
            # redis-py retries a timed-out command a few times before it gives up.
            with anyio.fail_after(60), pytest.raises(RedisError):
                await client.set("k", "v")
            assert anyio.current_time() - started >= REDIS_SOCKET_TIMEOUT_SECONDS
        finally:
            os.kill(server.pid, signal.SIGCONT)
        await wait_redis(client)
        assert await client.set("k", "v")
    finally:
        await client.aclose()
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
