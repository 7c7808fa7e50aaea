"""Reading a topic's kept history from its Redis Stream (catch-up, resets, finished streams)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import anyio
from redis.asyncio import Redis

from .frames import Frame, StreamPosition, format_stream_id, parse_stream_id
from .topics import stream_key

__all__ = ["Catchup", "StreamHistory"]

# One atomic read: what the Stream has lost (so a gap is reported, never skipped silently) and
# the entries after a position. Returns {exists, max-deleted id, entries-added, length,
# first id, last id, last type, entries}.
_CATCHUP_LUA: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local out = {1, '0-0', -1, 0, '', '', ''}
for i = 1, #info, 2 do
  local k, v = info[i], info[i + 1]
  if k == 'max-deleted-entry-id' then out[2] = v
  elseif k == 'entries-added' then out[3] = v
  elseif k == 'length' then out[4] = v
  elseif k == 'first-entry' and v then out[5] = v[1]
  elseif k == 'last-entry' and v then
    out[6] = v[1]
    local fields = v[2]
    for j = 1, #fields, 2 do if fields[j] == 't' then out[7] = fields[j + 1] end end
  end
end
out[8] = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])
return out
"""


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _frame(entry: Sequence[Any]) -> Frame:
    stream_id, raw = entry[0], entry[1]
    # A script answers flat [field, value, ...]; redis-py's xrange parses into a dict.
    pairs = raw.items() if isinstance(raw, Mapping) else zip(raw[::2], raw[1::2], strict=True)
    fields = {_bytes(k): _bytes(v) for k, v in pairs}
    return Frame(_bytes(stream_id), fields.get(b"t", b"message"), fields.get(b"d", b"{}"))


@dataclass(frozen=True, slots=True)
class Catchup:
    """One page of history after a position.

    ``reset``: entries after the position are no longer kept (trimmed, deleted or expired).
    ``last`` / ``last_terminal``: the newest entry at read time, where a reset resumes.
    ``more``: the page was full; read again after its last frame.
    """

    frames: list[Frame]
    reset: bool
    last: StreamPosition | None
    last_terminal: bool
    more: bool


class StreamHistory:
    """Reads of the Streams written by ``EventPublisher`` (same ``prefix``)."""

    def __init__(self, redis: Redis, *, prefix: str = "lookout:", concurrency: int = 32) -> None:
        self._redis = redis
        self._prefix = prefix
        self._script = redis.register_script(_CATCHUP_LUA)
        # Bounds the history reads of a reconnect storm to what the pool can serve.
        self._limiter = anyio.CapacityLimiter(concurrency)

    async def read_after(
        self, topic: str, position: StreamPosition | None, *, limit: int = 500
    ) -> Catchup:
        """Entries after ``position`` (exclusive); ``None`` reads from the very start, and then
        ``reset`` means the start itself is gone."""
        start = "-" if position is None else "(" + format_stream_id(position)
        async with self._limiter:
            reply = await self._script(keys=[stream_key(self._prefix, topic)], args=[start, limit])
        if not int(reply[0]):
            return Catchup(
                [], reset=position is not None, last=None, last_terminal=False, more=False
            )
        max_deleted = parse_stream_id(_bytes(reply[1]))
        added, length = int(reply[2]), int(reply[3])
        first = parse_stream_id(_bytes(reply[4])) if reply[4] else None
        last = parse_stream_id(_bytes(reply[5])) if reply[5] else None
        frames = [_frame(entry) for entry in reply[7]]
        trimmed = added < 0 or added > length  # entries-added is missing before Redis 7.0
        if position is None:
            reset = trimmed or max_deleted > (0, 0)
        else:
            # Trimming removes the oldest entries: a position before the first kept entry of a
            # trimmed Stream may have lost what followed it.
            reset = max_deleted > position or (
                trimmed
                and (first is None or position < first)
                and (last is None or position < last)
            )
        last_type = _bytes(reply[6])
        return Catchup(
            frames,
            reset=reset,
            last=last,
            last_terminal=bool(last_type) and Frame(b"0-0", last_type, b"").terminal,
            more=len(frames) >= limit,
        )

    async def last_frame(self, topic: str) -> Frame | None:
        """The newest kept entry of ``topic``."""
        async with self._limiter:
            entries = await self._redis.xrevrange(stream_key(self._prefix, topic), count=1)
        return _frame(entries[0]) if entries else None

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
