"""The hub on a Redis Cluster: one sharded pub/sub connection per primary, and streams that lose
nothing the Streams kept when a slot migrates, a primary restarts or its replica takes over.

The fault tests make a cluster of their own (a few seconds each); the others use the session's.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest
from redis.exceptions import RedisError

from streams import (
    Event,
    EventPublisher,
    RedisClient,
    channel_name,
    operation_topic,
    stream_key,
    user_topic,
)
from streams.hub import EventHub
from streams.sse import StreamOptions
from streams.topics import topic_slot
from tests.streams.either_redis import connect, hub_clients, numsub
from tests.streams.sse_client import SSEItem, collect, read_sse, wait_until
from tests.streams.support import Snapshots, make_app
from tests.streams.test_hub import frames, numbers
from tests.streams.test_resilience import next_event
from tests.streams.vocabulary import TERMINAL_TYPES
from tests.support.live import free_port, live_server
from tests.support.redis_cluster import LocalCluster, local_cluster

pytestmark = pytest.mark.anyio

PREFIX = "t:"


async def test_one_connection_per_primary_whatever_the_topics(
    redis_cluster: LocalCluster, redis_prefix: str
) -> None:
    client = connect(redis_cluster.url, "cluster")
    name = f"hub-{secrets.token_hex(4)}"
    topics = [operation_topic(f"op_{n}") for n in range(30)]
    try:
        publisher = EventPublisher(client, prefix=redis_prefix, terminal_types=TERMINAL_TYPES)
        async with (
            EventHub(client, prefix=redis_prefix, name=name, terminal_types=TERMINAL_TYPES) as hub,
            contextlib.AsyncExitStack() as stack,
        ):
            subs = [await stack.enter_async_context(hub.subscribe(t)) for t in topics]
            # 30 topics over 3 primaries: a connection to each owner, not one per topic.
            owners = {
                f"127.0.0.1:{redis_cluster.primary_of(channel_name(redis_prefix, t)).port}"
                for t in topics
            }
            connections = await hub_clients(client, name)
            assert sorted(node for node, _ in connections) == sorted(owners)
            # Each announcement comes from its own shard, and in one call per slot.
            await publisher.publish_many(
                [(Event.create("operation.progress", n=n), [t]) for n, t in enumerate(topics)]
            )
            assert [numbers(await frames(sub, 1)) for sub in subs] == [[n] for n in range(30)]
        channel = channel_name(redis_prefix, topics[0])
        await wait_until(lambda: _no_subscriber(client, channel))
    finally:
        await client.aclose()


async def test_an_unreachable_cluster_is_a_redis_error_and_streams_say_come_back(
    snapshots: Snapshots,
) -> None:
    # No node answers: every call fails as a single Redis that is down does (a RedisError that
    # callers handle), not with redis-py's RedisClusterException or inside an exception group.
    client = connect(f"redis://127.0.0.1:{free_port()}", "cluster", socket_connect_timeout=1)
    try:
        publisher = EventPublisher(client, prefix=PREFIX, terminal_types=TERMINAL_TYPES)
        op, user = operation_topic("op_nowhere"), user_topic("usr_nowhere")
        with pytest.raises(RedisError):
            await publisher.publish(Event.create("operation.started"), [op, user])
        async with EventHub(client, prefix=PREFIX, terminal_types=TERMINAL_TYPES) as hub:
            assert not hub.connected
            app = make_app(hub, snapshots, StreamOptions(max_seconds=None))
            async with live_server(app) as base, httpx.AsyncClient(base_url=base) as http:
                answer = await http.get("/users/usr_nowhere/events")  # reads where to start
                # An EventSource reconnects after a 200 that ends; an error it gives up on.
                assert answer.status_code == 200
                assert answer.text.startswith("retry:")
                assert "reconnect later" in answer.text
    finally:
        await client.aclose()


async def test_past_its_connections_the_cluster_client_waits_instead_of_refusing(
    redis_cluster: LocalCluster, redis_prefix: str
) -> None:
    # redis-py's cluster pools raise MaxConnectionsError when full; a burst (streams
    # reconnecting at once, say) must wait for a connection, as on a single Redis.
    client = connect(redis_cluster.url, "cluster", max_connections=2)
    try:
        key = f"{redis_prefix}burst"

        async def count() -> None:
            await client.incr(key)

        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(count)
        assert await client.get(key) == b"50"
    finally:
        await client.aclose()


async def _no_subscriber(client: RedisClient, channel: str) -> bool:
    return await numsub(client, channel) == 0


@dataclass
class Serving:
    """A hub, a publisher and the streams app on a cluster of the test's own."""

    cluster: LocalCluster
    client: RedisClient
    hub: EventHub
    publisher: EventPublisher
    http: httpx.AsyncClient

    async def publish(self, event: Event, topic: str) -> str:
        """Published once the cluster takes it (a node restarting, a failover under way)."""
        with anyio.fail_after(30):
            while True:
                try:
                    return (await self.publisher.publish(event, [topic]))[topic]
                except (RedisError, OSError):
                    await anyio.sleep(0.1)


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, snapshots: Snapshots, *, replicas: int = 0
) -> AsyncIterator[Serving]:
    with local_cluster(tmp_path / "cluster", replicas=replicas) as cluster:
        client = connect(cluster.url, "cluster")
        try:
            publisher = EventPublisher(client, prefix=PREFIX, terminal_types=TERMINAL_TYPES)
            async with EventHub(
                client,
                prefix=PREFIX,
                backoff_min=0.1,
                backoff_max=1.0,
                tick_seconds=0.05,
                terminal_types=TERMINAL_TYPES,
            ) as hub:
                await hub.wait_connected()
                app = make_app(hub, snapshots, StreamOptions(keepalive_seconds=1, max_seconds=None))
                async with (
                    live_server(app) as base,
                    httpx.AsyncClient(base_url=base, timeout=30) as http,
                ):
                    yield Serving(cluster, client, hub, publisher, http)
        finally:
            await client.aclose()


async def follow_through(
    serving: Serving, op_id: str, fault: Callable[[], Awaitable[None]]
) -> None:
    """A client follows an operation's stream; after its third event ``fault`` strikes, three
    more events and the terminal one are published: the client gets every one, in order, once,
    and so does a client that comes afterwards."""
    topic = operation_topic(op_id)

    def progress(n: int) -> Event:
        return Event.create("operation.progress", n=n)

    ids = [await serving.publish(progress(n), topic) for n in range(3)]
    received: list[SSEItem] = []
    # Held past the stream's end: then the hub's subscription can be seen where it is.
    async with (
        serving.hub.subscribe(topic),
        serving.http.stream("GET", f"/ops/{op_id}/events") as response,
    ):
        items = read_sse(response)
        received += [await next_event(items) for _ in range(3)]
        await fault()
        ids += [await serving.publish(progress(n), topic) for n in range(3, 6)]
        ids.append(await serving.publish(Event.create("operation.failed", n=6), topic))
        received += [await next_event(items) for _ in range(4)]
        # Subscribed on the node that serves the channel's slot now (the client's map,
        # refreshed by the publishes), once.
        assert await numsub(serving.client, channel_name(PREFIX, topic)) == 1
    assert [i.id for i in received] == ids
    assert [i.json["n"] for i in received] == list(range(7))
    _, again = await collect(serving.http, f"/ops/{op_id}/events")
    assert [i.id for i in again if i.kind == "event"] == ids


async def test_a_slot_migrated_mid_stream_loses_nothing(
    tmp_path: Path, snapshots: Snapshots
) -> None:
    async with serving(tmp_path, snapshots) as s:
        topic = operation_topic("op_moving")
        channel = channel_name(PREFIX, topic)
        before = s.cluster.primary_of(channel)
        after = next(p for p in s.cluster.primaries if p is not before)

        async def migrate() -> None:
            # The old node drops the hub's subscription (a sunsubscribe of its own) and
            # announces nothing more; the hub subscribes on the new node and catches up.
            s.cluster.migrate_slot(topic_slot(topic), after)

        await follow_through(s, "op_moving", migrate)
        assert s.cluster.primary_of(channel) is after
        await wait_until(lambda: _no_subscriber(s.client, channel))


async def test_a_primary_killed_and_restarted_mid_stream_loses_nothing_its_stream_kept(
    tmp_path: Path, snapshots: Snapshots
) -> None:
    async with serving(tmp_path, snapshots) as s:
        topic = operation_topic("op_restart")
        owner = s.cluster.primary_of(stream_key(PREFIX, topic))

        async def restart() -> None:
            owner.kill()  # SIGKILL; its append-only file has every write it answered
            owner.start()
            s.cluster.wait_ok()

        await follow_through(s, "op_restart", restart)
        assert s.hub.reconnects >= 1


async def test_a_primary_killed_mid_stream_its_replica_takes_over_and_nothing_is_lost(
    tmp_path: Path, snapshots: Snapshots
) -> None:
    async with serving(tmp_path, snapshots, replicas=1) as s:
        topic = operation_topic("op_failover")
        key = stream_key(PREFIX, topic)
        owner = s.cluster.primary_of(key)
        [replica] = s.cluster.replicas[s.cluster.primaries.index(owner)]

        async def failover() -> None:
            s.cluster.wait_replicated(owner)  # what the Stream kept is on the replica too
            owner.kill()
            await wait_until(lambda: s.cluster.primary_of(key) is replica, within=30)

        await follow_through(s, "op_failover", failover)
        assert s.cluster.primary_of(key) is replica
