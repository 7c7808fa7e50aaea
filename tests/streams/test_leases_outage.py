"""The stream-lease renewer outlives a Redis that goes away and comes back."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from redis.asyncio import Redis

from streams import StreamLeases
from tests.streams.sse_client import wait_until
from tests.support.redis_server import redis_process

pytestmark = pytest.mark.anyio


async def test_the_renewer_survives_a_redis_restart(tmp_path: Path) -> None:
    with redis_process(tmp_path / "redis") as server:
        # As the service's client: redis-py raises its own errors, with a read timeout.
        client = Redis(
            host="127.0.0.1", port=server.port, socket_timeout=2, socket_connect_timeout=2
        )
        try:
            await server.wait_ready()
            leases = StreamLeases(client, prefix="t:", limit=5, ttl_seconds=1.0)
            lease = await leases.acquire("usr_outage")
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    await tg.start(leases.run)
                    server.kill()
                    # Renewals every third of a second, all refused meanwhile.
                    await anyio.sleep(1.5)
                    server.start()
                    await server.wait_ready()

                    async def renewed() -> bool:
                        seconds, _ = await client.time()
                        score = await client.zscore(lease.key, lease.member)
                        return score is not None and score / 1000 > seconds

                    # The renewer, still running, puts the lapsed lease back.
                    await wait_until(renewed, within=20)
                    tg.cancel_scope.cancel()
        finally:
            await client.aclose()
