"""Append an event to each topic's Redis Stream and announce it, in one round trip.

Concurrent publishes are coalesced: every call queues its events, and up to two lanes (tasks)
send whatever is queued as one script call (``publish.lua``) per batch, two calls on their way
at once as long as they touch no Stream in common. Thousands of operations publishing progress
at once then cost a few round trips, not one each, and this process prepares a batch while
Redis runs the one before. On a Redis
Cluster a script call touches one slot, so calls are not coalesced there: each call is sent by
itself, one script call per slot (``cluster.publish_by_slot``).

A publish that raised may have been written in part or in full (a reply lost, one slot of a
cluster written and not another): the publisher remembers the events of the last
``UNSURE_KEPT`` calls that raised, and when one of them is published again (the caller's
retry, with the same ``Event``) the script first looks for it by its key among each Stream's
newest ``maxlen`` entries and writes it only where it is missing.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, Final

from .cluster import RedisClient, is_cluster, publish_by_slot
from .events import Event
from .scripts import LuaScript
from .topics import channel_name, ends_with_terminal, stream_key

__all__ = ["DEFAULT_MAXLEN", "DEFAULT_TTL_SECONDS", "EventPublisher", "PublisherStats"]

DEFAULT_MAXLEN: Final = 1000
DEFAULT_TTL_SECONDS: Final = 7 * 24 * 3600
# Stream entries per script call, at most (one caller's events are never split, so a larger
# publish_many goes alone). Redis runs a script without interruption: 512 entries keep it to a
# few milliseconds, while the round trip and the command's fixed costs are spread over
# hundreds of events (bench.publisher).
DEFAULT_BATCH_ENTRIES: Final = 512
# Events of failed publishes remembered, to be searched for when retried: far more than the
# callers that retry at once (each retries one call, within seconds).
UNSURE_KEPT: Final = 10_000
# Script calls on their way at once (each on a connection of its own): with two, this process
# prepares the next batch while Redis runs one, where one at a time made each wait for the
# other (about 10 us of each per event: bench.publisher).
PIPELINE_DEPTH: Final = 2


class PublisherStats:
    """Running totals: script calls made and Stream entries they carried."""

    __slots__ = ("calls", "entries")

    def __init__(self) -> None:
        self.calls = 0
        self.entries = 0


class _Request:
    """One publish_many call waiting for its Stream ids: its part of a script's KEYS and ARGV."""

    __slots__ = ("args", "future", "keys")

    def __init__(
        self, keys: list[str], args: list[bytes | str | int], future: asyncio.Future[list[Any]]
    ) -> None:
        self.keys = keys
        self.args = args
        self.future = future


class EventPublisher:
    """Publishes events to topics: capped, expiring Redis Streams plus pub/sub announcements.

    ``maxlen`` caps each topic's Stream; with ``exact_trim=False`` (the default) Redis trims
    approximately (``MAXLEN ~``), which is much cheaper and keeps at least ``maxlen`` entries.
    ``ttl_seconds`` is renewed on every publish, so a topic's history expires that long after
    its last event. An event of one of ``terminal_types`` ends a topic that ends (see
    ``topics.ends_with_terminal``): nothing published to it afterwards is kept.
    ``batch_entries``: how many Stream entries one script call carries at most, when many
    callers publish at once. ``on_published``: called with each event once its publish has
    succeeded (a metric's count), whichever method published it.
    """

    def __init__(
        self,
        redis: RedisClient,
        *,
        prefix: str = "lookout:",
        maxlen: int = DEFAULT_MAXLEN,
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
        exact_trim: bool = False,
        terminal_types: Collection[str] = frozenset(),
        batch_entries: int = DEFAULT_BATCH_ENTRIES,
        on_published: Callable[[Event], None] | None = None,
    ) -> None:
        if maxlen < 1:
            raise ValueError("EventPublisher maxlen must be at least 1")
        if ttl_seconds < 1:
            raise ValueError("EventPublisher ttl_seconds must be at least 1")
        if batch_entries < 1:
            raise ValueError("EventPublisher batch_entries must be at least 1")
        self._redis = redis
        self._prefix = prefix
        self._on_published = on_published
        self._maxlen = maxlen
        self._ttl = ttl_seconds
        self._trim_op = "=" if exact_trim else "~"
        if any(not t or " " in t for t in terminal_types):
            raise ValueError("terminal event types are non-empty and have no space")
        self._terminal_arg = " ".join(sorted(terminal_types))
        # publish.lua finds each topic's channel from its Stream key by these, so that the
        # channels are not sent: a third fewer arguments per event to pack, send and parse.
        self._key_head = _head(stream_key, prefix)
        self._channel_head = _head(channel_name, prefix)
        self._script = LuaScript(redis, "publish.lua")
        # --- Redis Cluster (streams.cluster): one script call per slot, SPUBLISH ---
        self._cluster = is_cluster(redis)
        if self._cluster and ("{" in prefix or "}" in prefix):
            raise ValueError(
                f"a Redis key prefix with braces ({prefix!r}) takes the hash tag of every key "
                "on a Redis Cluster; choose one without"
            )
        # SPUBLISH is delivered by the channel's own shard; PUBLISH would go to every node.
        self._announce = "SPUBLISH" if self._cluster else "PUBLISH"
        self._batch_entries = batch_entries
        self._queue: deque[_Request] = deque()
        # Lanes running (``_lane``), the loop they run on, and the Streams of their batches on
        # their way to Redis.
        self._lanes = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._busy: set[str] = set()
        # Keys of events whose publish raised (oldest first): a retry searches for them.
        self._unsure: dict[str, None] = {}
        self.stats = PublisherStats()

    async def publish(self, event: Event, topics: Iterable[str]) -> dict[str, str]:
        """Publish ``event`` to every topic; answers each topic's Stream id (its SSE ``id``)."""
        if self._cluster:
            [ids] = await self.publish_many([(event, topics)])
            return ids
        # publish_many's work for one event, without its lists of one: the usual call, made by
        # thousands of operations at once (bench.publisher).
        unique = list(dict.fromkeys(topics))
        if not unique:
            return {}
        keys: list[str] = []
        args: list[bytes | str | int] = []
        unsure = self._unsure
        self._add(event, unique, keys, args, self._maxlen if event.key in unsure else 0)
        try:
            raw = await self._submit(keys, args)
        except BaseException:
            self._remember_unsure([event])
            raise
        if unsure:
            unsure.pop(event.key, None)
        if self._on_published is not None:
            self._on_published(event)
        if len(unique) == 1:  # no comprehension: in Python 3.11 each one is a call of its own
            return {unique[0]: _text(raw[0])}
        return {topic: _text(one) for topic, one in zip(unique, raw, strict=True)}

    async def publish_many(
        self, items: Sequence[tuple[Event, Iterable[str]]]
    ) -> list[dict[str, str]]:
        """Publishes several events, in order, in one script call (atomic: a burst's hundreds
        of events cost one round trip and one command to encode); answers each one's Stream
        ids, as ``publish``. A topic named twice for one event counts once. An event for a
        topic that has already ended is dropped (answered with the ids of that topic's
        terminal event). On a Redis Cluster: one script call per slot, not atomic
        (``cluster.publish_by_slot``).

        On a single Redis, calls made while others are on their way are sent together, in the
        order they were made, in as few script calls as ``batch_entries`` allows; two script
        calls may be on their way at once, never two that touch the same topic: so each topic
        keeps the order of its publishes. An error of a script call (Redis unreachable,
        a script error) is raised in every call it carried; a call cancelled before its events
        were sent publishes nothing, and after that changes nothing for the others.

        Publishing the same ``Event`` objects again after an error is idempotent: where the
        first try wrote an event, the retry answers that entry's id and writes nothing."""
        planned = [(event, list(dict.fromkeys(topics))) for event, topics in items]
        try:
            if self._cluster:
                # A script call may touch one slot there, and a batch of several callers would
                # mix slots (CROSSSLOT): calls are not batched across callers on a cluster,
                # each goes by itself, one script call per slot (publish_by_slot).
                replies = await publish_by_slot(self._call, planned, retry_search=self._maxlen)
                answer = [{topic: _text(raw) for topic, raw in ids.items()} for ids in replies]
            else:
                keys, args = self._encode(planned)
                raw = await self._submit(keys, args) if keys else []
                ids = iter(raw)
                answer = [{topic: _text(next(ids)) for topic in topics} for _, topics in planned]
        except BaseException:
            self._remember_unsure([event for event, _ in planned])
            raise
        if self._unsure:
            for event, _ in planned:
                self._unsure.pop(event.key, None)
        if self._on_published is not None:
            for event, _ in planned:
                self._on_published(event)
        return answer

    def _remember_unsure(self, events: Iterable[Event]) -> None:
        """Written in full, in part or not at all: unknown. A retry searches first."""
        for event in events:
            self._unsure[event.key] = None
        while len(self._unsure) > UNSURE_KEPT:
            del self._unsure[next(iter(self._unsure))]

    def _add(
        self,
        event: Event,
        topics: list[str],
        keys: list[str],
        args: list[bytes | str | int],
        search: int,
    ) -> None:
        """Adds ``event`` to a script call: its topics' Streams to ``keys``, and its type, JSON,
        key, how many newest entries to search for it (``search``) and marks (publish.lua) to
        ``args``."""
        if len(topics) == 1:
            [topic] = topics
            keys.append(stream_key(self._prefix, topic))
            marks = "1" if ends_with_terminal(topic) else "0"
        else:
            keys += [stream_key(self._prefix, topic) for topic in topics]
            marks = "".join(["1" if ends_with_terminal(topic) else "0" for topic in topics])
        args += (event.type, event.encode(), event.key, search, marks)

    def _encode(
        self, planned: Sequence[tuple[Event, list[str]]], search: Mapping[str, int] = {}
    ) -> tuple[list[str], list[bytes | str | int]]:
        """The script's KEYS and the events' part of its ARGV (after the header), in order.
        An event whose publish raised before is searched for among each Stream's newest
        ``maxlen`` entries before it is written; one keyed in ``search``, among as many as it
        says (at least)."""
        keys: list[str] = []
        args: list[bytes | str | int] = []
        unsure = self._unsure
        for event, topics in planned:
            if topics:
                newest = self._maxlen if event.key in unsure else search.get(event.key, 0)
                self._add(event, topics, keys, args, newest)
        return keys, args

    async def _call(
        self, planned: Sequence[tuple[Event, list[str]]], search: Mapping[str, int]
    ) -> list[Any]:
        """One run of the script at once, unbatched (a cluster's slot): its raw reply, one per
        (event, topic) in order; the events keyed in ``search`` are searched for first."""
        keys, args = self._encode(planned, search)
        return await self._run(keys, args) if keys else []

    async def _run(self, keys: list[str], events: list[bytes | str | int]) -> list[Any]:
        """One script call: the header (ARGV[1..7], publish.lua), then ``events``."""
        args: list[bytes | str | int] = [
            self._trim_op,
            self._maxlen,
            self._ttl,
            self._terminal_arg,
            self._announce,
            self._key_head,
            self._channel_head,
        ]
        args += events
        self.stats.calls += 1
        self.stats.entries += len(keys)
        raw: list[Any] = await self._script(keys=keys, args=args)
        return raw

    def _submit(self, keys: list[str], args: list[bytes | str | int]) -> asyncio.Future[list[Any]]:
        """Queues a call's events; answers the future of their Stream ids. Not a coroutine: its
        callers await the future itself, one coroutine fewer to make and resume per publish.
        Cancelling a caller cancels only its future: a lane skips it if not yet sent."""
        loop = self._loop
        if loop is None or not self._lanes:
            loop = self._loop = asyncio.get_running_loop()
        # else the callers' loop, that the lanes run on: asking for the running loop costs a
        # getpid() system call (CPython checks for a fork), paid by every publish.
        request = _Request(keys, args, loop.create_future())
        self._queue.append(request)
        if self._lanes < PIPELINE_DEPTH:
            self._start_lane(loop)
        return request.future

    def _start_lane(self, loop: asyncio.AbstractEventLoop) -> None:
        self._lanes += 1
        loop.create_task(self._lane(loop), name="EventPublisher lane")

    async def _lane(self, loop: asyncio.AbstractEventLoop) -> None:
        """Sends what is queued, batch after batch, until nothing is that it may take.

        Up to ``PIPELINE_DEPTH`` lanes run at once, each with one script call on its way (on
        a connection of its own): this process builds and encodes the next batch, and resolves
        the last one's callers, while Redis runs the current one. Calls on two connections may
        run in either order, so a lane never takes a call that touches a Stream of a batch on
        its way: the queue's head waits for that batch (taken by its lane when it is back),
        and so does everything queued behind it. Each topic then gets its events in the order
        of their calls, as with one call at a time."""
        batch: list[_Request] = []
        busy = self._busy
        try:
            while self._queue:
                batch = self._take(busy)
                if not batch:
                    break  # the head waits for a batch on its way, whose lane takes it next
                if len(batch) == 1:
                    streams = set(batch[0].keys)
                else:
                    streams = {key for request in batch for key in request.keys}
                busy |= streams
                if self._queue and self._lanes < PIPELINE_DEPTH:
                    self._start_lane(loop)  # what is left goes while this is on its way
                try:
                    raw = await self._send(batch)
                except Exception as exc:  # the callers' error: each of them raises it
                    for request in batch:
                        if not request.future.done():
                            request.future.set_exception(exc)
                else:
                    start = 0
                    for request in batch:
                        end = start + len(request.keys)
                        if not request.future.done():
                            request.future.set_result(raw[start:end])
                        start = end
                finally:
                    busy -= streams
                batch = []
        finally:
            self._lanes -= 1
            if batch:
                # Only when this task is cancelled (its event loop shutting down): the callers
                # left cannot know whether their events were published, and are cancelled too.
                for request in (*batch, *self._queue):
                    request.future.cancel()
                self._queue.clear()

    async def _send(self, batch: list[_Request]) -> list[Any]:
        """One script call carrying ``batch`` in order; answers their Stream ids, in order."""
        if len(batch) == 1:
            return await self._run(batch[0].keys, batch[0].args)
        keys: list[str] = []
        args: list[bytes | str | int] = []
        for request in batch:
            keys += request.keys
            args += request.args
        return await self._run(keys, args)

    def _take(self, busy: set[str]) -> list[_Request]:
        """The next batch: queued calls, oldest first, up to ``batch_entries`` (at least one),
        none touching a Stream in ``busy``; empty when the oldest does."""
        batch: list[_Request] = []
        entries = 0
        queue = self._queue
        limit = self._batch_entries
        while queue:
            request = queue[0]
            if request.future.done():  # its caller was cancelled: nothing of it is sent
                queue.popleft()
                continue
            if batch and entries + len(request.keys) > limit:
                break
            if busy and not busy.isdisjoint(request.keys):
                break
            queue.popleft()
            batch.append(request)
            entries += len(request.keys)
        return batch


def _head(name_of: Callable[[str, str], str], prefix: str) -> str:
    """What every name ``name_of`` gives a topic has before the topic's hash tag."""
    name = name_of(prefix, "topic")
    if not name.endswith("{topic}"):
        raise RuntimeError(f"{name_of.__name__} must end a name with the topic's hash tag")
    return name.removesuffix("{topic}")


def _text(raw: object) -> str:
    if isinstance(raw, list):  # a dropped event: {its topic's terminal id} (publish.lua)
        raw = raw[0]
    return raw.decode() if isinstance(raw, bytes) else str(raw)
