"""Lookout on a Redis Cluster (or a Valkey cluster): the client, publishing slot by slot, and
the hub's sharded pub/sub backend.

Every Redis name of a topic carries the topic as its hash tag (``topics``), so a topic's
Stream and channel live in one slot, on one primary. What differs from a single Redis:

- A script may touch one slot per call: ``publish_by_slot`` splits a batch of events into one
  call per slot, operation topics first (they decide whether an event is dropped after its
  operation ended), then the other topics of the events that were kept.
- Announcements are ``SPUBLISH``: delivered by the shard that owns the channel's slot, where
  a ``PUBLISH`` is broadcast to every node of the cluster, so fan-out grows with the shards.
- ``ClusterLink``, the hub's backend: one ``SSUBSCRIBE`` connection (``link.RedisLink`` in
  sharded mode) per primary that owns subscribed slots, placed by the client's slot map. A
  ``MOVED`` answer, a ``sunsubscribe`` the node sent of its own accord (its slot migrated), a
  node that does not answer (a failover) make it refresh the map and subscribe where the slot
  lives now; those channels' subscribers then catch up from the Streams, as after a
  reconnect.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, Final, TypeAlias, TypeGuard

import anyio
import anyio.abc
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import ClusterDownError, RedisClusterException, RedisError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .backend import BackendListener, ChannelHandle
from .events import Event
from .link import RedisLink
from .pubsub import RedisEndpoint
from .topics import ends_with_terminal, topic_slot

__all__ = [
    "ClusterClient",
    "ClusterLink",
    "ClusterUnavailable",
    "RedisClient",
    "is_cluster",
    "publish_by_slot",
]

logger = logging.getLogger(__name__)

RedisClient: TypeAlias = Redis | RedisCluster
# The second step of a publish (publish_by_slot): tries in all, and the pauses between them.
# About 1.5 s: a blip (a connection reset, MOVED while a slot settles) is ridden out; a
# failover takes longer (the node timeout, 15 s by default) and is left to the caller's retry.
SECOND_STEP_TRIES: Final = 4
SECOND_STEP_PAUSES: Final = (0.1, 0.4, 1.0)
# Entries of a Stream the second step searches for its event before writing it (module
# publish_by_slot): every copy of a command a paused node runs when it wakes is then found,
# unless more than this many events of that topic were written between them.
SECOND_STEP_SEARCH: Final = 32
# What a node away answers (down, failing over, a slot without a primary for now).
UNAVAILABLE: Final = (RedisConnectionError, RedisTimeoutError, ClusterDownError, TryAgainError)
# One script call of the publisher: the events with their topics (all in one slot), answered
# with one raw reply per (event, topic), in order; an event keyed in the mapping is searched for
# among that many of each Stream's newest entries first, and written only where it is missing.
ScriptCall: TypeAlias = Callable[
    [list[tuple[Event, list[str]]], Mapping[str, int]], Awaitable[list[Any]]
]
# One slot's share of a publish: (index of the event in the batch, event, its topics there).
Group: TypeAlias = list[tuple[int, Event, list[str]]]


def is_cluster(redis: RedisClient) -> TypeGuard[RedisCluster]:
    return isinstance(redis, RedisCluster)


class ClusterUnavailable(RedisConnectionError):
    """No node of the Redis Cluster could be asked (none answers, or a slot has no owner): a
    connection error like any other, which callers already retry or report."""


class ClusterClient(RedisCluster):
    """The redis.asyncio cluster client, made to behave as Lookout's single-Redis client does:

    - Its failures to find the cluster are Redis errors: redis-py raises
      ``RedisClusterException``, which is not one, where a single Redis that is down raises
      ``ConnectionError``; every ``except RedisError`` in Lookout then holds.
    - Past ``max_connections`` a command waits (up to ``pool_timeout``) for one to finish, as
      with a ``BlockingConnectionPool``: redis-py's cluster pools raise at once when full (a
      burst of streams reconnecting would be refused). Commands in flight never exceed
      ``max_connections``, so neither do any node's connections.
    """

    def __init__(self, *args: Any, pool_timeout: float = 10.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._most = int(kwargs.get("max_connections", 100))  # redis-py's default
        self._in_flight = anyio.Semaphore(self._most)
        self._pool_timeout = pool_timeout

    async def initialize(
        self,
        additional_startup_nodes_info: list[tuple[str, int]] | None = None,
        last_failed_node_name: str | None = None,
    ) -> RedisCluster:
        try:
            return await super().initialize(additional_startup_nodes_info, last_failed_node_name)
        except RedisClusterException as exc:
            raise ClusterUnavailable(str(exc)) from exc

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        waited = True
        with anyio.move_on_after(self._pool_timeout):
            await self._in_flight.acquire()
            waited = False
        if waited:
            raise RedisConnectionError(
                f"no Redis connection free within {self._pool_timeout:g} s "
                f"({self._most} commands in flight)"
            )
        try:
            return await super().execute_command(*args, **kwargs)
        except RedisClusterException as exc:
            if "not covered" in str(exc) or "cannot be connected" in str(exc):
                raise ClusterUnavailable(str(exc)) from exc
            raise
        finally:
            self._in_flight.release()


async def publish_by_slot(
    call: ScriptCall, planned: Sequence[tuple[Event, list[str]]], *, retry_search: int
) -> list[dict[str, Any]]:
    """``EventPublisher.publish_many`` on a cluster: the raw replies per event and topic.

    First every event's operation topics (those that end), one call per slot, all slots at
    once; an event whose operation had ended is dropped there (its reply is a list holding the
    terminal id, as the script answers it) and answered so for all its topics. Then the other
    topics of the events that were kept, one call per slot. Each topic gets its events in
    order; unlike one call on a single Redis, the topics of one event are written in two steps,
    not atomically: a reader of a user's topic may see an event a moment after its operation's.

    What keeps the two steps whole:

    - The second step searches each Stream's newest ``SECOND_STEP_SEARCH`` entries for the
      event before writing it: redis-py sends a command again on a new connection when the
      reply did not come (a node paused, a connection cut after the write), and a node that
      comes back runs every copy it was sent; one of them writes, the others find it.
    - A call of the second step that fails for want of a node (down, failing over, refusing
      while the cluster settles) is tried again, ``SECOND_STEP_TRIES`` times in all over about
      ``sum(SECOND_STEP_PAUSES)`` seconds, each retry searching the newest ``retry_search``
      entries (the publisher's ``maxlen``), so the first step's writes are not left alone by
      a blip.
    - If it still fails, the error is raised, as on a single Redis: the publish has not
      succeeded, and the caller's retry of the same events (``EventPublisher``: idempotent)
      writes only what is missing.
    - An event dropped because its operation has ended copies that operation's terminal event
      to its other topics where they lack it (searched for by its key): a process that died
      between the two steps of a terminal event left the user's topic without it, and the
      terminal event published again (the finalize sweep, by any instance) repairs that.
    """
    raw: list[dict[str, Any]] = [{} for _ in planned]
    dropped: dict[int, list[Any]] = {}
    # Copies of a dropped event's terminal event, for the event's other topics: searched for.
    copies: dict[int, Event] = {}

    async def run(
        slot: int, group: Group, search: dict[str, int], failed: dict[int, Exception]
    ) -> None:
        try:
            replies = iter(await call([(event, topics) for _, event, topics in group], search))
        except Exception as exc:  # the other calls finish: what they wrote is known
            failed[slot] = exc
            return
        for index, _, topics in group:
            for topic in topics:
                reply = next(replies)
                if isinstance(reply, list):
                    dropped[index] = reply
                raw[index][topic] = reply

    for ending in (True, False):
        groups: dict[int, Group] = {}
        for index, (event, topics) in enumerate(planned):
            if index in dropped:
                if index not in copies:
                    continue
                event = copies[index]
            for topic in topics:
                if ends_with_terminal(topic) is not ending:
                    continue
                group = groups.setdefault(topic_slot(topic), [])
                if group and group[-1][0] == index:
                    group[-1][2].append(topic)
                else:
                    group.append((index, event, [topic]))
        # The second step of an event split in two searches before it writes (an event of
        # one step is as on a single Redis); a copy (a repair) searches every entry kept.
        search = {
            event.key: SECOND_STEP_SEARCH
            for event, topics in ([] if ending else planned)
            if any(ends_with_terminal(topic) for topic in topics)
        }
        search.update((event.key, retry_search) for event in copies.values())
        tries = 1 if ending else SECOND_STEP_TRIES
        for attempt in range(tries):
            failed: dict[int, Exception] = {}
            async with anyio.create_task_group() as tg:
                for slot, group in groups.items():
                    tg.start_soon(run, slot, group, search, failed)
            if not failed or attempt + 1 == tries:
                break
            if not all(isinstance(exc, UNAVAILABLE) for exc in failed.values()):
                break  # not a node away (a script error): trying again would not help
            # Only the calls that failed go again, searching first: a call whose reply was
            # lost (a node that died or stalled after writing) may have written.
            groups = {slot: groups[slot] for slot in failed}
            search.update(
                (event.key, retry_search) for group in groups.values() for _, event, _ in group
            )
            logger.info(
                "publishing to %d slot(s) failed (%s); trying again", len(failed), _first(failed)
            )
            await anyio.sleep(SECOND_STEP_PAUSES[attempt])
        if failed:
            # As one call on a single Redis raises it (a RedisError the caller handles), not
            # in a group. The slots that took their call keep it: a retry finds it there.
            raise next(iter(failed.values()))
        if ending:
            copies = {i: copy for i, reply in dropped.items() if (copy := _terminal_copy(reply))}
    for index, ended in dropped.items():
        raw[index] = {topic: ended for topic in planned[index][1]}
    return [{topic: raw[i][topic] for topic in topics} for i, (_, topics) in enumerate(planned)]


def _first(failed: dict[int, Exception]) -> str:
    return type(next(iter(failed.values()))).__name__


def _terminal_copy(reply: list[Any]) -> Event | None:
    """The terminal event a dropped event's reply names ({id, type, JSON, key}), with its key,
    to copy to the event's other topics; None for an entry written without a key."""
    if len(reply) < 4 or not reply[3]:
        return None
    etype, data, key = (_str(v) for v in reply[1:4])
    return Event(etype, json.loads(data), key=key)


def _str(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Shard:
    """One primary's sharded pub/sub connection, with the channels placed on it: the link's
    listener (the hub's table, filtered to these channels) and its ``ShardEvents``."""

    def __init__(self, owner: ClusterLink, node: ClusterNode) -> None:
        self.owner = owner
        self.node = node.name
        self.names: set[bytes] = set()
        # Placed here after another node (or an earlier run) had them: their subscribers
        # resync once the subscription is confirmed.
        self.moved: set[bytes] = set()
        self.link = RedisLink(
            RedisEndpoint.of_node(node),
            name=owner.name,
            ping_seconds=owner.ping_seconds,
            backoff=owner.backoff,
            shard=self,
        )
        self.scope = anyio.CancelScope()

    async def run(self) -> None:
        with self.scope:
            await self.link.run(self)

    def stop(self) -> None:
        self.link.close()
        self.scope.cancel()

    def _holds(self, name: bytes) -> bool:
        return self.owner.placement(name) is self

    # BackendListener, for the link

    def channels(self) -> list[ChannelHandle]:
        return [c for c in self.owner.listener.channels() if c.name in self.names]

    def confirmed(self, channel: ChannelHandle) -> None:
        if not self._holds(channel.name):
            return  # confirmed by a node it has moved away from: the new one's counts
        self.owner.listener.confirmed(channel)
        if channel.name in self.moved:
            self.moved.discard(channel.name)
            self.owner.resync_soon(channel)

    def deliver(self, name: bytes, payload: bytes, now: float) -> None:
        # Also from a node a channel is moving away from: a frame twice is dropped by the
        # stream (it knows its position), a frame missed is caught up from the Stream.
        self.owner.listener.deliver(name, payload, now)

    def skipped(self, why: str, detail: object) -> None:
        self.owner.listener.skipped(why, detail)

    def resynced(self, channels: Collection[ChannelHandle]) -> None:
        self.owner.listener.resynced(channels)

    # ShardEvents

    def refused(self, channels: Sequence[ChannelHandle], error: str) -> None:
        names = [c.name for c in channels if self._holds(c.name)]
        if names:
            logger.info("event hub: %s refused %d channels (%s)", self.node, len(names), error)
            self.owner.unsettle(names)

    def dropped(self, name: bytes) -> None:
        if self._holds(name):
            logger.info("event hub: %s dropped a channel (its slot moved)", self.node)
            self.owner.unsettle([name])

    def lost(self) -> None:
        self.owner.look_again()


class ClusterLink:
    """A ``HubBackend`` on a Redis Cluster: sharded pub/sub, one connection per primary that
    owns subscribed slots, reference counting left to the hub as on one Redis.

    The client's slot map says where a channel goes (``slots_cache``, refreshed with
    ``nodes_manager.initialize()``); it is refreshed every ``refresh_seconds``, at once when a
    node refuses or drops a channel, and with backoff while a node does not answer.
    """

    def __init__(
        self,
        cluster: RedisCluster,
        *,
        name: str,
        ping_seconds: float = 5.0,
        backoff: tuple[float, float] = (0.1, 5.0),
        refresh_seconds: float = 30.0,
    ) -> None:
        self._cluster = cluster
        self.name = name
        self.ping_seconds = ping_seconds
        self.backoff = backoff
        self._refresh_seconds = refresh_seconds
        self._listener: BackendListener | None = None
        self._shards: dict[str, _Shard] = {}
        self._placed: dict[bytes, _Shard] = {}
        # Wanted channels that no node holds for now: placed again after the next refresh.
        self._unsettled: set[bytes] = set()
        self._resync: list[ChannelHandle] = []
        self._tg: anyio.abc.TaskGroup | None = None
        self._scope: anyio.CancelScope | None = None
        self._wake = anyio.Event()
        self._started = anyio.Event()
        self._closed = False
        self._served = False
        self.refreshes = 0

    @property
    def listener(self) -> BackendListener:
        assert self._listener is not None, "ClusterLink.run has not started"
        return self._listener

    def placement(self, name: bytes) -> _Shard | None:
        return self._placed.get(name)

    @property
    def connected(self) -> bool:
        return self._tg is not None and all(s.link.connected for s in self._shards.values())

    @property
    def live(self) -> bool:
        return any(s.link.live for s in self._shards.values())

    async def wait_connected(self) -> None:
        while not self.connected:
            waiting = [s for s in self._shards.values() if not s.link.connected]
            # Shards come and go with the slot map: look again now and then.
            with anyio.move_on_after(0.1):
                if waiting:
                    await waiting[0].link.wait_connected()
                else:
                    await self._started.wait()

    def subscribe(self, channel: ChannelHandle) -> None:
        if self._tg is not None:  # else run() places every channel when it starts
            self._place(channel, moved=False)

    def unsubscribe(self, name: bytes) -> None:
        self._unsettled.discard(name)
        shard = self._placed.pop(name, None)
        if shard is not None:
            shard.names.discard(name)
            shard.moved.discard(name)
            shard.link.unsubscribe(name)

    def ping(self) -> None:
        for shard in self._shards.values():
            if shard.link.live:
                shard.link.ping()

    def close(self) -> None:
        self._closed = True
        for shard in self._shards.values():
            shard.link.close()
        if self._scope is not None:
            self._scope.cancel()

    async def run(self, listener: BackendListener) -> None:
        """Learn the slot map, place every channel, and keep them placed until ``close()``."""
        self._listener = listener
        delay = self.backoff[0]
        while not self._closed:
            try:
                await self._cluster.initialize()
                break
            except (RedisError, RedisClusterException, OSError) as exc:
                logger.warning("event hub cannot reach the Redis Cluster (%s); retrying", exc)
            await anyio.sleep(delay)
            delay = min(delay * 2, self.backoff[1])
        # After a crash (the supervisor runs us again) every channel was away: it resyncs.
        resync, self._served = self._served, True
        try:
            with anyio.CancelScope() as self._scope:
                if self._closed:
                    self._scope.cancel()
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    for channel in listener.channels():
                        self._place(channel, moved=resync)
                    self._started.set()
                    await self._keep_placed()
        finally:
            self._tg = self._scope = None
            self._started = anyio.Event()
            self._shards.clear()
            self._placed.clear()
            self._unsettled.clear()

    # What the shards report

    def unsettle(self, names: Sequence[bytes]) -> None:
        for name in names:
            shard = self._placed.pop(name, None)
            if shard is not None:
                shard.names.discard(name)
                shard.moved.discard(name)
            self._unsettled.add(name)
        self.look_again()

    def look_again(self) -> None:
        """Refresh the slot map now (a node is gone: its slots may have a new primary)."""
        self._wake.set()

    def resync_soon(self, channel: ChannelHandle) -> None:
        """Resync ``channel``'s subscribers once the confirmations read with it are handled,
        so that a slot's channels moving together make one resync."""
        if not self._resync:
            asyncio.get_running_loop().call_soon(self._flush_resync)
        self._resync.append(channel)

    def _flush_resync(self) -> None:
        channels, self._resync = self._resync, []
        if self._listener is not None and channels:
            self._listener.resynced(channels)

    # Placement

    def _owner(self, name: bytes) -> ClusterNode | None:
        nodes = self._cluster.nodes_manager.slots_cache.get(key_slot(name))
        return nodes[0] if nodes else None

    def _place(self, channel: ChannelHandle, *, moved: bool) -> None:
        name = channel.name
        node = self._owner(name)
        if node is None:
            self._unsettled.add(name)
            self._wake.set()
            return
        shard = self._shards.get(node.name)
        if shard is None:
            assert self._tg is not None
            shard = self._shards[node.name] = _Shard(self, node)
            self._tg.start_soon(shard.run)
        self._placed[name] = shard
        shard.names.add(name)
        if moved:
            shard.moved.add(name)
        shard.link.subscribe(channel)

    async def _keep_placed(self) -> None:
        """Refresh the slot map and move what is not where its slot lives; paced with backoff
        while the cluster is unsettled (a failover under way refuses for seconds)."""
        delay = self.backoff[0]
        while True:
            with anyio.move_on_after(self._refresh_seconds):
                await self._wake.wait()
            self._wake = anyio.Event()
            settled = False
            try:
                await self._cluster.nodes_manager.initialize()
            except (RedisError, RedisClusterException, OSError) as exc:
                logger.warning("event hub cannot refresh the Redis Cluster's slots (%s)", exc)
            else:
                self.refreshes += 1
                settled = self._reconcile()
            if settled:
                delay = self.backoff[0]
                continue
            await anyio.sleep(delay)
            delay = min(delay * 2, self.backoff[1])
            self._wake.set()

    def _reconcile(self) -> bool:
        """Place every wanted channel on the primary of its slot; answers whether all was in
        place already and every shard connected."""
        moved = 0
        wanted = {c.name: c for c in self.listener.channels()}
        self._unsettled &= wanted.keys()
        for name, channel in wanted.items():
            node = self._owner(name)
            shard = self._placed.get(name)
            if node is None or (shard is not None and shard.node == node.name):
                continue
            if shard is not None:  # its slot moved: leave the old node, if it still holds it
                self.unsubscribe(name)
            self._unsettled.discard(name)
            self._place(channel, moved=True)
            moved += 1
        for node_name, shard in list(self._shards.items()):
            if not shard.names:
                shard.stop()
                del self._shards[node_name]
        if moved:
            logger.info("event hub: %d channels moved to the nodes that serve them now", moved)
        return not moved and not self._unsettled and self.connected
