"""What the streams tests ask of Redis besides the service's own commands, on a single Redis
and on a Redis Cluster alike: clients, the hub's connections and channels, a publish by hand,
and a listener on raw channels."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

import anyio
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from streams import ClusterClient, RedisClient
from streams.hub import EventHub
from streams.link import RedisLink
from streams.pubsub import PubSubConnection, RedisEndpoint, encode_command

__all__ = [
    "Listener",
    "RedisMode",
    "connect",
    "hub_clients",
    "hub_links",
    "kill_hub_connections",
    "listen",
    "numsub",
    "publish_by_hand",
]

RedisMode = Literal["single", "cluster"]


def connect(url: str, mode: RedisMode, **kwargs: Any) -> RedisClient:
    """A client as the service makes it: a cluster client on a cluster."""
    if mode == "cluster":
        return ClusterClient.from_url(url, **kwargs)
    return Redis.from_url(url, **kwargs)


async def numsub(redis: RedisClient, channel: str) -> int:
    """Subscribers of ``channel`` (on a cluster: sharded ones, on the channel's node)."""
    if isinstance(redis, RedisCluster):
        await redis.initialize()
        node = redis.get_node_from_key(channel)
        reply = await redis.execute_command("PUBSUB SHARDNUMSUB", channel, target_nodes=node)
    else:
        reply = await redis.pubsub_numsub(channel)
    [(_, count)] = reply
    return int(count)


async def hub_clients(redis: RedisClient, name: str) -> list[tuple[str, str]]:
    """(node, client id) of every connection named ``name``: the hub's."""
    if isinstance(redis, RedisCluster):
        await redis.initialize()
        found = []
        for node in redis.get_primaries():
            for client in await redis.client_list(target_nodes=node):
                if client.get("name") == name:
                    found.append((node.name, client["id"]))
        return found
    return [("", c["id"]) for c in await redis.client_list() if c.get("name") == name]


async def kill_hub_connections(redis: RedisClient, name: str) -> int:
    """Cut every connection named ``name``, as a network failure would."""
    found = await hub_clients(redis, name)
    for node_name, client_id in found:
        if isinstance(redis, RedisCluster):
            node = redis.get_node(node_name=node_name)
            await redis.client_kill_filter(_id=client_id, target_nodes=node)
        else:
            await redis.client_kill_filter(_id=client_id)
    return len(found)


def hub_links(hub: EventHub) -> list[RedisLink]:
    """The hub's pub/sub links: one, or one per primary it subscribes on."""
    link: Any = hub._link
    if isinstance(link, RedisLink):
        return [link]
    return [shard.link for shard in link._shards.values()]


async def publish_by_hand(redis: RedisClient, channel: str, payload: bytes) -> int:
    """An operator's PUBLISH (SPUBLISH on a cluster) on a Lookout channel."""
    if isinstance(redis, RedisCluster):
        return int(await redis.spublish(channel, payload))
    return int(await redis.publish(channel, payload))


class Listener:
    """Raw announcements on some channels: (channel, payload) in arrival order."""

    def __init__(self, connections: Sequence[PubSubConnection], kind: bytes) -> None:
        self._connections = connections
        self._kind = kind
        self._got: list[tuple[bytes, bytes]] = []
        self._arrived = anyio.Event()

    async def _read(self, conn: PubSubConnection) -> None:
        while True:
            for reply in await conn.receive():
                if reply[0] == self._kind:
                    self._got.append((reply[1], reply[2]))
                    self._arrived.set()

    async def take(self, count: int, *, within: float = 5) -> list[tuple[bytes, bytes]]:
        with anyio.fail_after(within):
            while len(self._got) < count:
                self._arrived = anyio.Event()
                await self._arrived.wait()
        taken, self._got = self._got[:count], self._got[count:]
        return taken


@contextlib.asynccontextmanager
async def listen(redis: RedisClient, *channels: str) -> AsyncIterator[Listener]:
    """Subscribed to ``channels`` (confirmed) until the block ends; on a cluster, sharded, on
    each channel's node."""
    if isinstance(redis, RedisCluster):
        await redis.initialize()
        by_node: dict[str, list[str]] = {}
        endpoints: dict[str, RedisEndpoint] = {}
        for channel in channels:
            node = redis.get_node_from_key(channel)
            assert node is not None
            by_node.setdefault(node.name, []).append(channel)
            endpoints[node.name] = RedisEndpoint.of_node(node)
        plan = [(endpoints[name], wanted) for name, wanted in by_node.items()]
        command, kind = "SSUBSCRIBE", b"smessage"
    else:
        plan = [(RedisEndpoint.from_client(redis), list(channels))]
        command, kind = "SUBSCRIBE", b"message"
    async with contextlib.AsyncExitStack() as stack:
        connections = []
        for endpoint, wanted in plan:
            conn = await stack.enter_async_context(await PubSubConnection.connect(endpoint))
            for channel in wanted:  # one by one: a cluster refuses channels of several slots
                await conn.send(encode_command(command, channel))
                assert (await conn.receive())[0][0] == command.lower().encode()
            connections.append(conn)
        listener = Listener(connections, kind)
        async with anyio.create_task_group() as tg:
            for conn in connections:
                tg.start_soon(listener._read, conn)
            yield listener
            tg.cancel_scope.cancel()
