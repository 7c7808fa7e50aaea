"""The stream-lease renewer outlives a Redis that goes away and comes back."""

from __future__ import annotations

import subprocess
from pathlib import Path

import anyio
import pytest
from redis.asyncio import Redis

from streams import StreamLeases
from tests.streams.sse_client import wait_until
from tests.streams.test_resilience import start_redis, throwaway_redis, wait_redis

pytestmark = pytest.mark.anyio

__all__ = ["throwaway_redis"]  # a fixture, used by name


async def test_the_renewer_survives_a_redis_restart(throwaway_redis: tuple[int, Path]) -> None:
    port, data = throwaway_redis
    server = start_redis(port, data)
    # As the service's client: redis-py raises its own errors, with a read timeout.
    client = Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2)
    try:
        await wait_redis(client)
        leases = StreamLeases(client, prefix="t:", limit=5, ttl_seconds=1.0)
        lease = await leases.acquire("usr_outage")
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                await tg.start(leases.run)
                server.terminate()
                server.wait(timeout=10)
                # Renewals every third of a second, all refused meanwhile.
                await anyio.sleep(1.5)
                server = start_redis(port, data)
                await wait_redis(client)

                async def renewed() -> bool:
                    seconds, _ = await client.time()
                    score = await client.zscore(lease.key, lease.member)
                    return score is not None and score / 1000 > seconds

                # The renewer, still running, puts the lapsed lease back.
                await wait_until(renewed, within=20)
                tg.cancel_scope.cancel()
    finally:
        await client.aclose()
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
