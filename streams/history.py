"""Reading a topic's kept history from its Redis Stream (catch-up, resets, finished streams)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from .cluster import RedisClient
from .frames import Frame, StreamPosition, format_stream_id, parse_stream_id
from .scripts import LuaScript
from .topics import stream_key

__all__ = ["Catchup", "StreamHistory"]


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _frame(entry: Sequence[Any], terminal_types: frozenset[bytes]) -> Frame:
    stream_id, raw = entry[0], entry[1]
    # A script answers flat [field, value, ...]; redis-py's xrange parses into a dict.
    pairs = raw.items() if isinstance(raw, Mapping) else zip(raw[::2], raw[1::2], strict=True)
    fields = {_bytes(k): _bytes(v) for k, v in pairs}
    event_type = fields.get(b"t", b"message")
    return Frame(
        _bytes(stream_id),
        event_type,
        fields.get(b"d", b"{}"),
        terminal=event_type in terminal_types,
    )


@dataclass(frozen=True, slots=True)
class Catchup:
    """One page of history after a position.

    ``reset``: what followed the position is not all kept (trimmed, deleted, expired, or lost
    by Redis: a position the Stream never held or beyond its newest id).
    ``last``: the newest id the Stream generated at read time, where a reset resumes (None: no
    Stream); ``last_terminal``: whether its newest kept entry ends the topic.
    ``more``: the page was full; read again after its last frame.
    """

    frames: list[Frame]
    reset: bool
    last: StreamPosition | None
    last_terminal: bool
    more: bool


def _gap(
    position: StreamPosition | None,
    *,
    head: StreamPosition,
    first: StreamPosition | None,
    max_deleted: StreamPosition,
    trimmed: bool,
    held: bool,
) -> bool:
    """Whether entries after ``position`` may be missing from an existing Stream."""
    if position is None:  # from the very start: is the start itself gone?
        return trimmed or max_deleted > (0, 0)
    if position > head:
        # Ahead of every id the Stream generated: Redis lost what it had acknowledged (a
        # failover to a replica that lagged, a restart without persistence).
        return True
    if max_deleted > position:
        return True  # an entry after the position was deleted
    if first is None:
        # Nothing is kept: all is lost unless nothing came after the position.
        return position < head
    if position < first:
        # Trimming removes the oldest entries: before the first kept entry of a trimmed Stream,
        # what followed the position may be gone.
        return trimmed
    # Within the kept range the Stream must hold the position itself, unless it was deleted.
    return not held and max_deleted != position


class StreamHistory:
    """Reads of the Streams written by ``EventPublisher`` (same ``prefix``); an event of one of
    ``terminal_types`` ends its topic (as the publisher was told)."""

    def __init__(
        self,
        redis: RedisClient,
        *,
        prefix: str = "lookout:",
        concurrency: int = 32,
        terminal_types: Collection[str] = frozenset(),
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._terminal_names = frozenset(terminal_types)
        self._terminal = frozenset(t.encode() for t in terminal_types)
        self._script = LuaScript(redis, "history_catchup.lua")
        self._head_script = LuaScript(redis, "history_head.lua")
        # Bounds the history reads of a reconnect storm to what the pool can serve.
        self._limiter = anyio.CapacityLimiter(concurrency)

    async def read_after(
        self, topic: str, position: StreamPosition | None, *, limit: int = 500
    ) -> Catchup:
        """Entries after ``position`` (exclusive); ``None`` reads from the very start, and then
        ``reset`` means the start itself is gone. A missing Stream is a gap after a position
        (its history expired or was lost) and nothing at all from the start."""
        start = "-" if position is None else format_stream_id(position)
        async with self._limiter:
            reply = await self._script(keys=[stream_key(self._prefix, topic)], args=[start, limit])
        if not int(reply[0]):
            return Catchup(
                [], reset=position is not None, last=None, last_terminal=False, more=False
            )
        added, length = int(reply[2]), int(reply[3])
        head = parse_stream_id(_bytes(reply[5]))
        frames = [_frame(entry, self._terminal) for entry in reply[8]]
        reset = _gap(
            position,
            head=head,
            first=parse_stream_id(_bytes(reply[4])) if reply[4] else None,
            max_deleted=parse_stream_id(_bytes(reply[1])),
            # entries-added is missing before Redis 7.0: then assume the worst.
            trimmed=added < 0 or added > length,
            held=bool(int(reply[7])),
        )
        last_type = _bytes(reply[6])
        return Catchup(
            frames,
            reset=reset,
            last=head if head > (0, 0) else None,
            # Decoded as a Frame's type is: an entry no instance wrote fails the read here too.
            last_terminal=last_type.decode() in self._terminal_names,
            more=len(frames) >= limit,
        )

    async def head(self, topic: str) -> StreamPosition | None:
        """The newest id ``topic``'s Stream generated (None: there is no Stream): reading after
        it later yields exactly what was published since."""
        async with self._limiter:
            reply = await self._head_script(keys=[stream_key(self._prefix, topic)])
        return None if reply is None else parse_stream_id(_bytes(reply))

    async def last_frame(self, topic: str) -> Frame | None:
        """The newest kept entry of ``topic``."""
        async with self._limiter:
            entries = await self._redis.xrevrange(stream_key(self._prefix, topic), count=1)
        return _frame(entries[0], self._terminal) if entries else None

    async def is_fully_delivered(self, topic: str, last_event_id: str | None) -> bool:
        """True when ``last_event_id`` is the id of the topic's terminal event, so that a
        reconnect can be answered 204 instead of a stream that would end at once."""
        if not last_event_id:
            return False
        try:
            position = parse_stream_id(last_event_id)
        except ValueError:
            return False
        frame = await self.last_frame(topic)
        return frame is not None and frame.terminal and frame.position == position
