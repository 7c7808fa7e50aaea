"""redis-py's asyncio connection, with its commands packed by hiredis.

redis-py's asyncio ``Connection.pack_command`` writes the Redis protocol in Python, argument by
argument, and grows its buffer by joining it again for each one: for one publish script call of
512 events (six arguments each) that is 2.8 ms, 5.5 µs of every event and a quarter of the
publisher's CPU (bench.publisher). hiredis (already a dependency: redis-py's reply parser)
packs the same bytes in C in an eighth of that. redis-py's synchronous client does this by
itself (``redis.connection.HiredisRespSerializer``); its asyncio one does not, so a client
opts in with ``connection_class=PackedConnection`` (``app.application.redis_client``).

The bytes are the same as redis-py's (str as UTF-8, bytes, memoryview, int, float: checked by
tests/streams/test_connection.py); what hiredis does not take (a bytearray, and what redis-py
refuses: None, bool, other types) goes to redis-py's own packing, which packs it or raises its
``DataError`` as before. A client whose encoding is not UTF-8 must not use it. A ``rediss://``
or ``unix://`` URL names its own connection class to ``from_url``, which keeps redis-py's packing.
"""

from __future__ import annotations

import hiredis
from redis.asyncio.connection import Connection
from redis.typing import EncodableT

__all__ = ["PackedConnection"]


class PackedConnection(Connection):
    """A TCP connection to Redis whose commands hiredis packs (see the module)."""

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        # As redis-py does: a command name of several words ("CONFIG GET") is several arguments.
        first = args[0]
        if isinstance(first, str):
            args = (*first.encode().split(), *args[1:])
        elif isinstance(first, bytes) and b" " in first:
            args = (*first.split(), *args[1:])
        try:
            # hiredis's stub types the tuple as of one item; it takes any number.
            return [hiredis.pack_command(args)]  # type: ignore[arg-type]
        except TypeError:
            return super().pack_command(*args)
