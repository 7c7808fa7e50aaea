"""The hub's link to Redis: one pub/sub connection kept in step with the hub's channel table.

The link reconnects with exponential backoff and re-subscribes every channel in the table; it
pipelines SUBSCRIBE, UNSUBSCRIBE and PING and matches their replies in order (Redis answers
them in the order sent), which tells when a channel is confirmed and when the connection is
ready; and it fans every announcement out to the local members of its channel. Which channels
the table holds, and who their members are, is the hub's business (``hub``).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
import hiredis

from .frames import Frame
from .pubsub import PubSubConnection, PubSubError, RedisEndpoint, encode_command
from .subscription import Subscription

if TYPE_CHECKING:
    from .hub import HubStats

__all__ = ["Channel", "HubLink"]

logger = logging.getLogger(__name__)

_CONNECTION_ERRORS = (
    OSError,
    hiredis.ProtocolError,  # bytes that are not RESP: not a Redis, or a stream out of step
    TimeoutError,
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    PubSubError,
)
_SUBSCRIBE_BATCH = 512
# Markers in the FIFO of replies the hub waits for (one per channel of each command).
_UNSUBSCRIBED = "unsubscribed"
_PONG = "pong"
_READY = "ready"


class Channel:
    """A Redis channel local clients want: ``subs`` counts them, ``members`` is ``subs``
    frozen for the fan-out, which then neither copies it nor trips over a change."""

    __slots__ = ("confirmed", "members", "name", "subs")

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.subs: dict[Subscription, None] = {}
        self.members: tuple[Subscription, ...] = ()
        self.confirmed = anyio.Event()


class HubLink:
    """Keeps ``channels`` (the hub's table, shared, not copied) subscribed on one connection.

    ``on_resync`` is called once the connection is ready again after a reconnect, when every
    channel is subscribed anew: whatever was published in between is only in the Streams.
    """

    def __init__(
        self,
        endpoint: RedisEndpoint,
        channels: dict[bytes, Channel],
        stats: HubStats,
        *,
        name: str,
        ping_seconds: float,
        backoff: tuple[float, float],
        on_resync: Callable[[], None],
    ) -> None:
        self._endpoint = endpoint
        self._channels = channels
        self._stats = stats
        self._name = name
        self._ping = ping_seconds
        self._backoff = backoff
        self._on_resync = on_resync
        self._acks: deque[Channel | str] = deque()
        self._outbox: list[bytes] = []
        self._outbox_ready = anyio.Event()
        self._conn: PubSubConnection | None = None
        self._connected = anyio.Event()
        self._closed = False
        # Served before (also before a crash and restart): what was published while away is
        # only in the Streams, so subscribers resync once the next connection is ready.
        self._served = False

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def live(self) -> bool:
        """Connected and ready, so that a keep-alive PING is worth sending."""
        return self._conn is not None and self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    def subscribe(self, channel: Channel) -> None:
        # Without a connection the next one subscribes the whole table anyway.
        if self._conn is not None:
            self._queue_command(encode_command("SUBSCRIBE", channel.name), [channel])

    def unsubscribe(self, name: bytes) -> None:
        if self._conn is not None:
            self._queue_command(encode_command("UNSUBSCRIBE", name), [_UNSUBSCRIBED])

    def ping(self) -> None:
        self._queue_command(encode_command("PING"), [_PONG])

    def close(self) -> None:
        """Stop reconnecting; release everyone waiting for a channel to be confirmed."""
        self._closed = True
        for channel in self._channels.values():
            channel.confirmed.set()  # nobody waits for a subscription that will not come

    async def run(self) -> None:
        """Connect, serve, and reconnect with backoff, until ``close()``."""
        delay = self._backoff[0]
        while not self._closed:
            try:
                conn = await PubSubConnection.connect(self._endpoint, name=self._name)
            except _CONNECTION_ERRORS as exc:
                logger.warning("event hub cannot reach Redis (%s); retrying in %.1fs", exc, delay)
            else:
                delay = self._backoff[0]
                async with conn:
                    resync, self._served = self._served, True
                    await self._serve(conn, resync=resync)
                if self._closed:
                    return
                logger.warning("event hub lost Redis; reconnecting in %.1fs", delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, self._backoff[1])

    async def _serve(self, conn: PubSubConnection, *, resync: bool) -> None:
        self._acks.clear()
        self._outbox.clear()
        self._conn = conn
        names = list(self._channels)
        for start in range(0, len(names), _SUBSCRIBE_BATCH):
            batch = names[start : start + _SUBSCRIBE_BATCH]
            self._queue_command(
                encode_command("SUBSCRIBE", *batch), [self._channels[n] for n in batch]
            )
        # The PING's answer comes after every re-subscription's: then nothing more is missed.
        self._queue_command(encode_command("PING"), [_READY if resync else _PONG])
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._write_loop, conn, tg.cancel_scope)
                try:
                    await self._read_loop(conn)
                except _CONNECTION_ERRORS as exc:
                    logger.info("event hub connection ended: %r", exc)
                finally:
                    tg.cancel_scope.cancel()
        finally:
            self._conn = None
            if self._connected.is_set():
                self._connected = anyio.Event()

    def _queue_command(self, command: bytes, acks: list[Channel | str]) -> None:
        self._outbox.append(command)
        self._acks.extend(acks)
        self._outbox_ready.set()

    async def _write_loop(self, conn: PubSubConnection, scope: anyio.CancelScope) -> None:
        try:
            while True:
                await self._outbox_ready.wait()
                self._outbox_ready = anyio.Event()
                data, self._outbox = b"".join(self._outbox), []
                await conn.send(data)
        except _CONNECTION_ERRORS as exc:
            logger.info("event hub could not write to Redis: %r", exc)
            scope.cancel()

    async def _read_loop(self, conn: PubSubConnection) -> None:
        channels = self._channels
        silence = max(self._ping * 3, 1.0)
        while True:
            with anyio.fail_after(silence):
                replies = await conn.receive()
            now = anyio.current_time()
            for reply in replies:
                if type(reply) is list and reply and reply[0] == b"message":
                    if len(reply) != 3:
                        self._skip(reply, "a message of an unknown shape")
                        continue
                    channel = channels.get(reply[1])
                    if channel is not None and channel.members:
                        try:
                            frame = Frame.from_announcement(reply[2])
                        except (ValueError, TypeError) as exc:
                            self._skip(reply, str(exc))
                            continue
                        for sub in channel.members:
                            sub._offer(frame, now)
                        self._stats.offered += len(channel.members)
                else:
                    self._acknowledge(reply)

    def _skip(self, reply: list[object], why: str) -> None:
        # Someone PUBLISHed on a Lookout channel by hand, or an instance of another version
        # did: one bad message must not end every stream of the process.
        self._stats.malformed += 1
        logger.warning("event hub skipped a malformed pub/sub message (%s): %.200r", why, reply[1:])

    def _acknowledge(self, reply: object) -> None:
        if not self._acks:
            raise PubSubError(f"unexpected reply on the hub's connection: {reply!r}")
        expected = self._acks.popleft()
        if isinstance(expected, Channel):
            expected.confirmed.set()
        elif expected in (_READY, _PONG) and not self._connected.is_set():
            self._connected.set()
            if expected == _READY:
                self._on_resync()
