"""Append an event to each topic's Redis Stream and announce it, in one round trip."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any, Final

from .cluster import RedisClient, is_cluster, publish_by_slot
from .events import Event
from .scripts import lua_script
from .topics import channel_name, ends_with_terminal, stream_key

__all__ = ["DEFAULT_MAXLEN", "DEFAULT_TTL_SECONDS", "EventPublisher"]

DEFAULT_MAXLEN: Final = 1000
DEFAULT_TTL_SECONDS: Final = 7 * 24 * 3600

_PUBLISH_LUA: Final = lua_script("publish.lua")


class EventPublisher:
    """Publishes events to topics: capped, expiring Redis Streams plus pub/sub announcements.

    ``maxlen`` caps each topic's Stream; with ``exact_trim=False`` (the default) Redis trims
    approximately (``MAXLEN ~``), which is much cheaper and keeps at least ``maxlen`` entries.
    ``ttl_seconds`` is renewed on every publish, so a topic's history expires that long after
    its last event. An event of one of ``terminal_types`` ends a topic that ends (see
    ``topics.ends_with_terminal``): nothing published to it afterwards is kept.
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
    ) -> None:
        if maxlen < 1:
            raise ValueError("EventPublisher maxlen must be at least 1")
        if ttl_seconds < 1:
            raise ValueError("EventPublisher ttl_seconds must be at least 1")
        self._redis = redis
        self._prefix = prefix
        self._maxlen = maxlen
        self._ttl = ttl_seconds
        self._trim_op = "=" if exact_trim else "~"
        if any(not t or " " in t for t in terminal_types):
            raise ValueError("terminal event types are non-empty and have no space")
        self._terminal_arg = " ".join(sorted(terminal_types))
        self._script = redis.register_script(_PUBLISH_LUA)
        # --- Redis Cluster (streams.cluster): one script call per slot, SPUBLISH ---
        self._cluster = is_cluster(redis)
        if self._cluster and ("{" in prefix or "}" in prefix):
            raise ValueError(
                f"a Redis key prefix with braces ({prefix!r}) takes the hash tag of every key "
                "on a Redis Cluster; choose one without"
            )
        # SPUBLISH is delivered by the channel's own shard; PUBLISH would go to every node.
        self._announce = "SPUBLISH" if self._cluster else "PUBLISH"

    async def publish(self, event: Event, topics: Iterable[str]) -> dict[str, str]:
        """Publish ``event`` to every topic; answers each topic's Stream id (its SSE ``id``)."""
        [ids] = await self.publish_many([(event, topics)])
        return ids

    async def publish_many(
        self, items: Sequence[tuple[Event, Iterable[str]]]
    ) -> list[dict[str, str]]:
        """Publishes several events, in order, in one command (one script: atomic, and a
        burst's hundreds of events cost one round trip and one command to encode); answers
        each one's Stream ids, as ``publish``. A topic named twice for one event counts once.
        An event for a topic that has already ended is dropped (answered with the ids of that
        topic's terminal event)."""
        planned = [(event, list(dict.fromkeys(topics))) for event, topics in items]
        if self._cluster:  # a script call may touch one slot there
            replies = await publish_by_slot(self._call, planned)
            return [{topic: _text(raw) for topic, raw in ids.items()} for ids in replies]
        ids = iter(await self._call(planned))
        return [{topic: _text(next(ids)) for topic in topics} for _, topics in planned]

    async def _call(self, planned: Sequence[tuple[Event, list[str]]]) -> list[Any]:
        """One run of the script: its raw reply, one per (event, topic) in order."""
        keys: list[str] = []
        args: list[bytes | str | int] = [
            self._trim_op,
            self._maxlen,
            self._ttl,
            self._terminal_arg,
            self._announce,
        ]
        for event, topics in planned:
            if not topics:
                continue
            keys += [stream_key(self._prefix, topic) for topic in topics]
            args += [event.type, event.encode(), len(topics)]
            args += [channel_name(self._prefix, topic) for topic in topics]
            args += ["1" if ends_with_terminal(topic) else "0" for topic in topics]
        if not keys:
            return []
        reply: list[Any] = await self._script(keys=keys, args=args)
        return reply


def _text(raw: object) -> str:
    if isinstance(raw, list):  # a dropped event: {its topic's terminal id} (publish.lua)
        raw = raw[0]
    return raw.decode() if isinstance(raw, bytes) else str(raw)
