"""A slow client among fast ones, and a Redis restart in the middle of a stream."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import anyio
import httpx
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from streams import Event, EventPublisher, operation_topic
from streams.hub import EventHub
from streams.sse import StreamOptions
from tests.streams.conftest import Snapshots, make_app
from tests.streams.sse_client import SSEItem, collect, read_sse, wait_until
from tests.support.live import free_port, live_server

pytestmark = pytest.mark.anyio


async def test_a_slow_client_is_cut_off_and_a_fast_one_gets_everything(
    redis: Redis, redis_prefix: str, publisher: EventPublisher, snapshots: Snapshots
) -> None:
    topic = operation_topic("op_slow")
    padding = "x" * 65536
    count = 150
    async with EventHub(redis, prefix=redis_prefix, queue_size=8) as hub:
        await hub.wait_connected()
        app = make_app(hub, snapshots, StreamOptions(max_seconds=None))
        async with live_server(app) as base, httpx.AsyncClient(base_url=base, timeout=30) as client:
            port = int(base.rsplit(":", 1)[1])
            # A client that sends its request and then never reads.
            slow = await anyio.connect_tcp("127.0.0.1", port)
            await slow.send(b"GET /ops/op_slow/events HTTP/1.1\r\nHost: x\r\n\r\n")
            received: list[SSEItem] = []
            async with client.stream("GET", "/ops/op_slow/events") as response:
                items = read_sse(response)
                assert (await anext(items)).kind == "retry"
                await wait_until(lambda: hub.subscriber_count(topic) == 2)

                async def publish() -> None:
                    for n in range(count):
                        event = Event.create("operation.progress", n=n, pad=padding)
                        await publisher.publish(event, [topic])
                    await publisher.publish(Event.create("operation.completed"), [topic])

                async with anyio.create_task_group() as tg:
                    tg.start_soon(publish)
                    with anyio.fail_after(30):
                        async for item in items:
                            received.append(item)
            assert [i.json["n"] for i in received[:-1]] == list(range(count))
            assert received[-1].event == "operation.completed"

            # The slow client was disconnected: what it can still read ends well short.
            data = bytearray()
            with anyio.fail_after(30):
                try:
                    while chunk := await slow.receive():
                        data += chunk
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    pass
            await slow.aclose()
            assert data.startswith(b"HTTP/1.1 200")
            assert data.count(b"event: operation.progress") < count
            assert b"event: operation.completed" not in data
            assert hub.subscriber_count(topic) == 0


@pytest.fixture
def throwaway_redis(tmp_path: Path) -> tuple[int, Path]:
    if shutil.which("redis-server") is None:
        pytest.skip("needs a redis-server binary to restart")
    return free_port(), tmp_path


def start_redis(port: int, data: Path) -> subprocess.Popen[bytes]:
    # An append-only file written at every command: what the Stream kept survives a kill.
    return subprocess.Popen(
        [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes", "--appendfsync", "always", "--dir", str(data),
        ],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip


async def wait_redis(client: Redis) -> None:
    with anyio.fail_after(15):
        while True:
            try:
                await client.ping()
                return
            except (RedisConnectionError, OSError):
                await anyio.sleep(0.05)


async def test_a_redis_restart_mid_stream_loses_nothing_the_stream_kept(
    throwaway_redis: tuple[int, Path], snapshots: Snapshots
) -> None:
    port, data = throwaway_redis
    server = start_redis(port, data)
    client = Redis(host="127.0.0.1", port=port)
    try:
        await wait_redis(client)
        publisher = EventPublisher(client, prefix="t:")
        topic = operation_topic("op_restart")

        async def publish(event: Event) -> str:
            with anyio.fail_after(15):
                while True:
                    try:
                        return (await publisher.publish(event, [topic]))[topic]
                    except (RedisConnectionError, OSError):
                        await anyio.sleep(0.05)

        async with EventHub(client, prefix="t:", backoff_min=0.5) as hub:
            await hub.wait_connected()
            app = make_app(hub, snapshots, StreamOptions(keepalive_seconds=1, max_seconds=None))
            async with (
                live_server(app) as base,
                httpx.AsyncClient(base_url=base, timeout=30) as http,
            ):
                ids = [await publish(Event.create("operation.progress", n=n)) for n in range(3)]
                received: list[SSEItem] = []
                async with http.stream("GET", "/ops/op_restart/events") as response:
                    items = read_sse(response)
                    with anyio.fail_after(20):
                        async for item in items:
                            if item.kind != "event":
                                continue
                            received.append(item)
                            if len(received) == 3:
                                server.kill()
                                server.wait()
                                server = start_redis(port, data)
                                await wait_redis(client)
                                # Published while the hub waits to reconnect.
                                for n in range(3, 6):
                                    ids.append(
                                        await publish(Event.create("operation.progress", n=n))
                                    )
                            elif len(received) == 6:
                                ids.append(await publish(Event.create("operation.failed", n=6)))
                            elif item.event == "operation.failed":
                                break
                assert hub.reconnects >= 1
                assert [i.id for i in received] == ids
                assert [i.json["n"] for i in received] == list(range(7))
                # The history outlived the restart: a late client still gets all of it.
                _, again = await collect(http, "/ops/op_restart/events")
                assert [i.id for i in again if i.kind == "event"] == ids
    finally:
        await client.aclose()
        server.kill()
        server.wait()
