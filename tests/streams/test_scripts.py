"""A script call survives a Redis that restarts at its worst moment: after redis-py answered
NOSCRIPT by loading the script, before its second try (found as a flaky resilience test)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from streams.events import Event
from streams.history import StreamHistory
from streams.publisher import EventPublisher
from streams.topics import user_topic
from tests.support.redis_server import RedisProcess, redis_process

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


class RestartsAfterLoading(Redis):
    """A client to a server that restarts right after this client's next SCRIPT LOAD (a real
    restart of a real server, its script cache empty again), once."""

    def __init__(self, server: RedisProcess) -> None:
        super().__init__(host="127.0.0.1", port=server.port)
        self.server = server
        self.armed = False
        self.restarts = 0

    async def script_load(self, script: Any) -> Any:
        sha = await super().script_load(script)
        if self.armed:
            self.armed = False
            self.server.kill()
            self.server.start()
            await self.server.wait_ready()
            self.restarts += 1
        return sha


async def test_a_restart_between_loading_a_script_and_running_it_is_not_an_error(
    tmp_path: Path,
) -> None:
    with redis_process(tmp_path, persistence="aof") as server:
        await server.wait_ready()
        client = RestartsAfterLoading(server)
        try:
            publisher = EventPublisher(client, prefix="t:")
            history = StreamHistory(client, prefix="t:")
            topic = user_topic("usr_script")
            await client.script_flush()  # the next EVALSHA answers NOSCRIPT
            client.armed = True
            ids = await publisher.publish(Event.create("subscription.updated", n=1), [topic])
            await client.script_flush()
            client.armed = True
            catchup = await history.read_after(topic, None)
        finally:
            await client.aclose()
    assert client.restarts == 2
    assert [frame.id for frame in catchup.frames] == [ids[topic]]
