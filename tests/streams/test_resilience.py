"""A slow client among fast ones, and a Redis restart in the middle of a stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from streams import Event, EventPublisher, RedisClient, operation_topic, stream_key, user_topic
from streams.hub import EventHub
from streams.sse import StreamOptions
from tests.streams.sse_client import SSEItem, collect, read_sse, wait_until
from tests.streams.support import Snapshots, make_app
from tests.streams.vocabulary import TERMINAL_TYPES
from tests.support.live import live_server
from tests.support.redis_server import redis_process

pytestmark = pytest.mark.anyio


async def test_a_slow_client_is_cut_off_and_a_fast_one_gets_everything(
    redis: RedisClient, redis_prefix: str, publisher: EventPublisher, snapshots: Snapshots
) -> None:
    topic = operation_topic("op_slow")
    padding = "x" * 65536
    count = 150
    # 32 frames of 64 KiB: slack for the fast reader on a loaded machine (8 was cut off once
    # in CI), still far below the 150 that the slow one never reads.
    async with EventHub(
        redis, prefix=redis_prefix, queue_size=32, terminal_types=TERMINAL_TYPES
    ) as hub:
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


async def test_a_redis_restart_mid_stream_loses_nothing_the_stream_kept(
    tmp_path: Path, snapshots: Snapshots
) -> None:
    with redis_process(tmp_path) as server:
        await server.wait_ready()
        client = server.client()
        try:
            publisher = EventPublisher(client, prefix="t:", terminal_types=TERMINAL_TYPES)
            topic = operation_topic("op_restart")

            async def publish(event: Event) -> str:
                return await publish_when_up(publisher, event, topic)

            async with EventHub(
                client, prefix="t:", backoff_min=0.5, terminal_types=TERMINAL_TYPES
            ) as hub:
                await hub.wait_connected()
                options = StreamOptions(keepalive_seconds=1, max_seconds=None)
                app = make_app(hub, snapshots, options)
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
                                    server.start()
                                    await server.wait_ready()
                                    # Published while the hub waits to reconnect.
                                    for n in range(3, 6):
                                        ids.append(
                                            await publish(Event.create("operation.progress", n=n))
                                        )
                                elif len(received) == 6:
                                    failed = Event.create("operation.failed", n=6)
                                    ids.append(await publish(failed))
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


async def publish_when_up(publisher: EventPublisher, event: Event, topic: str) -> str:
    with anyio.fail_after(15):
        while True:
            try:
                return (await publisher.publish(event, [topic]))[topic]
            except (RedisConnectionError, OSError):
                await anyio.sleep(0.05)


async def next_event(items: AsyncIterator[SSEItem]) -> SSEItem:
    """The next event, past keep-alive comments."""
    with anyio.fail_after(20):
        async for item in items:
            if item.kind == "event":
                return item
    raise AssertionError("the stream ended before its next event")


async def test_after_a_redis_restart_user_streams_catch_up_without_a_reset(
    tmp_path: Path, snapshots: Snapshots
) -> None:
    """A restart that lost nothing (append-only file) is no gap: clients with and without a
    position catch up from the Stream and never see stream.reset."""
    with redis_process(tmp_path, persistence="aof") as server:
        await server.wait_ready()
        client = server.client()
        try:
            publisher = EventPublisher(client, prefix="t:", terminal_types=TERMINAL_TYPES)
            fresh, known = user_topic("usr_fresh"), user_topic("usr_known")
            before = await publish_when_up(publisher, Event.create("subscription.updated"), known)
            async with EventHub(
                client,
                prefix="t:",
                backoff_min=0.5,
                tick_seconds=0.05,
                terminal_types=TERMINAL_TYPES,
            ) as hub:
                await hub.wait_connected()
                options = StreamOptions(keepalive_seconds=1, max_seconds=None)
                app = make_app(hub, snapshots, options)
                async with (
                    live_server(app) as base,
                    httpx.AsyncClient(base_url=base, timeout=30) as http,
                    http.stream("GET", "/users/usr_fresh/events") as first,
                    http.stream(
                        "GET", "/users/usr_known/events", headers={"Last-Event-ID": before}
                    ) as second,
                ):
                    streams = {fresh: read_sse(first), known: read_sse(second)}
                    for items in streams.values():
                        assert (await anext(items)).kind == "retry"
                    await wait_until(lambda: hub.subscriber_count() == 2)
                    server.kill()
                    server.start()
                    await server.wait_ready()
                    sent: dict[str, list[str]] = {fresh: [], known: []}
                    for topic in sent:  # while the hub is away: only the Stream has them
                        event = Event.create("subscription.updated", n=1)
                        sent[topic].append(await publish_when_up(publisher, event, topic))
                    await wait_until(lambda: hub.reconnects >= 1 and hub.connected, within=20)
                    for topic in sent:
                        event = Event.create("subscription.updated", n=2)
                        sent[topic].append(await publish_when_up(publisher, event, topic))
                    for topic, items in streams.items():
                        got = [await next_event(items) for _ in sent[topic]]
                        assert [(i.event, i.id) for i in got] == [
                            ("subscription.updated", id_) for id_ in sent[topic]
                        ], topic
        finally:
            await client.aclose()


async def test_events_redis_lost_after_acknowledging_them_are_a_gap_with_a_reset(
    tmp_path: Path, snapshots: Snapshots
) -> None:
    """Redis restarts from a snapshot older than the last events it published (as a failover
    to a lagging replica does): a position it no longer holds is answered with stream.reset,
    for the client that stayed connected and for those that reconnect with it."""
    with redis_process(tmp_path, persistence="rdb") as server:
        await server.wait_ready()
        client = server.client()
        try:
            publisher = EventPublisher(client, prefix="t:", terminal_types=TERMINAL_TYPES)
            topic = user_topic("usr_lossy")
            snapshots.by_topic[topic] = {"subscriptions": [{"id": "sub_1", "status": "active"}]}
            kept = await publish_when_up(publisher, Event.create("subscription.updated"), topic)
            await client.save()  # what survives the restart
            async with EventHub(
                client,
                prefix="t:",
                backoff_min=0.5,
                tick_seconds=0.05,
                terminal_types=TERMINAL_TYPES,
            ) as hub:
                await hub.wait_connected()
                options = StreamOptions(keepalive_seconds=1, max_seconds=None)
                app = make_app(hub, snapshots, options)
                async with (
                    live_server(app) as base,
                    httpx.AsyncClient(base_url=base, timeout=30) as http,
                    http.stream("GET", "/users/usr_lossy/events") as connected,
                ):
                    items = read_sse(connected)
                    assert (await anext(items)).kind == "retry"
                    lost = [
                        await publish_when_up(
                            publisher, Event.create("subscription.updated"), topic
                        )
                        for _ in range(2)
                    ]
                    assert [(await next_event(items)).id for _ in lost] == lost

                    server.kill()
                    server.start()
                    await server.wait_ready()
                    assert await client.xlen(stream_key("t:", topic)) == 1  # lost for real

                    def is_reset(item: SSEItem, at: str) -> bool:
                        return (
                            item.event == "stream.reset"
                            and item.id == at
                            and item.json["snapshot"] == snapshots.by_topic[topic]
                            and item.json["user_id"] == "usr_lossy"
                        )

                    # The client that stayed: told once the hub is back.
                    assert is_reset(await next_event(items), kept)
                    # A client that reconnects with the last id it got: told too.
                    headers = {"Last-Event-ID": lost[-1]}
                    async with http.stream(
                        "GET", "/users/usr_lossy/events", headers=headers
                    ) as back:
                        again = read_sse(back)
                        assert (await anext(again)).kind == "retry"
                        assert is_reset(await next_event(again), kept)
                    # New events go on after the reset; the lost id stays unknown, and newer
                    # ids around it do not make it known.
                    later = await publish_when_up(
                        publisher, Event.create("subscription.updated"), topic
                    )
                    assert (await next_event(items)).id == later
                    async with http.stream(
                        "GET", "/users/usr_lossy/events", headers=headers
                    ) as late:
                        again = read_sse(late)
                        assert (await anext(again)).kind == "retry"
                        assert is_reset(await next_event(again), later)
        finally:
            await client.aclose()
