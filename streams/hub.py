"""The per-process hub: one Redis pub/sub connection, fanned out to every local client."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from types import TracebackType

import anyio
import anyio.abc
from redis.asyncio import Redis

from .frames import Frame
from .history import StreamHistory
from .pubsub import PubSubConnection, PubSubError, RedisEndpoint, encode_command
from .subscription import Signal, Subscription
from .topics import channel_name

__all__ = ["EventHub", "HubClosed", "HubStats"]

logger = logging.getLogger(__name__)

_CONNECTION_ERRORS = (
    OSError,
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


class HubClosed(RuntimeError):
    """The hub is shutting down; open the stream on another instance."""


class _Channel:
    __slots__ = ("confirmed", "members", "name", "subs")

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.subs: dict[Subscription, None] = {}
        self.members: tuple[Subscription, ...] = ()
        self.confirmed = anyio.Event()


@dataclass(slots=True)
class HubStats:
    """Running totals for metrics: plain integers, bumped on the fan-out path."""

    offered: int = 0  # frames handed to client queues
    slow_clients_dropped: int = 0  # clients cut off because their queue was full


class EventHub:
    """Fans Redis pub/sub announcements out to bounded per-client queues.

    One connection per process however many clients; a channel is subscribed while at least
    one local client wants it. After Redis drops, the hub reconnects with exponential backoff,
    re-subscribes, and then sends every subscriber ``Signal.RESYNC`` so that it catches up from
    the topic's Stream. Run it with ``async with EventHub(redis) as hub`` or start ``run`` in a
    lifespan task group; ``close()`` (or setting ``shutdown``) ends every stream politely.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = "lookout:",
        endpoint: RedisEndpoint | None = None,
        queue_size: int = 256,
        tick_seconds: float = 1.0,
        ping_seconds: float = 5.0,
        backoff_min: float = 0.1,
        backoff_max: float = 5.0,
        history_concurrency: int = 32,
        name: str = "lookout-hub",
        shutdown: anyio.Event | None = None,
    ) -> None:
        self._prefix = prefix
        self.name = name
        self._shutdown = shutdown
        self._endpoint = endpoint or RedisEndpoint.from_client(redis)
        self._queue_size = queue_size
        self._tick = tick_seconds
        self._ping = ping_seconds
        self._backoff = (backoff_min, backoff_max)
        self.history = StreamHistory(redis, prefix=prefix, concurrency=history_concurrency)
        self._channels: dict[bytes, _Channel] = {}
        self._subs: dict[Subscription, None] = {}
        self._acks: deque[_Channel | str] = deque()
        self._outbox: list[bytes] = []
        self._outbox_ready = anyio.Event()
        self._conn: PubSubConnection | None = None
        self._connected = anyio.Event()
        self._closed = False
        self._scope: anyio.CancelScope | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self.reconnects = 0
        self.stats = HubStats()

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def closed(self) -> bool:
        return self._closed

    def subscriber_count(self, topic: str | None = None) -> int:
        if topic is None:
            return len(self._subs)
        channel = self._channels.get(channel_name(self._prefix, topic).encode())
        return 0 if channel is None else len(channel.subs)

    async def wait_connected(self) -> None:
        await self._connected.wait()

    def subscribe(
        self, topic: str, *, keepalive: float = 15.0, max_seconds: float | None = None
    ) -> Subscription:
        """A subscription to ``topic``; ``await sub.ready()`` (or ``async with``) before reading
        history. ``keepalive``: idle seconds before ``Signal.IDLE``; ``max_seconds``: lifetime
        before ``Signal.EXPIRED``."""
        if self._closed:
            raise HubClosed("the event hub is shutting down; reconnect to another instance")
        name = channel_name(self._prefix, topic).encode()
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = _Channel(name)
            if self._conn is not None:
                self._queue_command(encode_command("SUBSCRIBE", name), [channel])
        now = anyio.current_time()
        sub = Subscription(
            topic,
            channel,
            self._release,
            maxsize=self._queue_size,
            idle_after=max(keepalive - self._tick, 0.0),
            deadline=None if max_seconds is None else now + max_seconds,
            now=now,
        )
        channel.subs[sub] = None
        channel.members = tuple(channel.subs)
        self._subs[sub] = None
        return sub

    def _release(self, sub: Subscription) -> None:
        if sub._state is Signal.OVERFLOW and sub in self._subs:
            self.stats.slow_clients_dropped += 1
        self._subs.pop(sub, None)
        channel = sub._channel
        if sub not in channel.subs:
            return
        del channel.subs[sub]
        channel.members = tuple(channel.subs)
        if not channel.subs and self._channels.get(channel.name) is channel:
            del self._channels[channel.name]
            if self._conn is not None:
                self._queue_command(encode_command("UNSUBSCRIBE", channel.name), [_UNSUBSCRIBED])

    def close(self) -> None:
        """Tell every subscriber ``Signal.CLOSED`` and stop. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subs):
            sub._terminate(Signal.CLOSED)
        for channel in self._channels.values():
            channel.confirmed.set()  # nobody waits for a subscription that will not come
        if self._scope is not None:
            self._scope.cancel()

    async def __aenter__(self) -> EventHub:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        await self._tg.start(self.run)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self.close()
        assert self._tg is not None
        return await self._tg.__aexit__(exc_type, exc, tb)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until ``close()``; reports started at once (Redis may still be down)."""
        if self._scope is not None:
            raise RuntimeError("EventHub.run is already running")
        with anyio.CancelScope() as scope:
            self._scope = scope
            if self._closed:
                scope.cancel()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._tick_loop)
                if self._shutdown is not None:
                    tg.start_soon(self._close_on, self._shutdown)
                task_status.started()
                await self._connection_loop()
                tg.cancel_scope.cancel()

    async def _close_on(self, event: anyio.Event) -> None:
        await event.wait()
        self.close()

    async def _connection_loop(self) -> None:
        delay, first = self._backoff[0], True
        while not self._closed:
            try:
                conn = await PubSubConnection.connect(self._endpoint, name=self.name)
            except _CONNECTION_ERRORS as exc:
                logger.warning("event hub cannot reach Redis (%s); retrying in %.1fs", exc, delay)
            else:
                delay = self._backoff[0]
                async with conn:
                    await self._serve(conn, resync=not first)
                first = False
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

    def _queue_command(self, command: bytes, acks: list[_Channel | str]) -> None:
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
                if type(reply) is list and reply[0] == b"message":
                    channel = channels.get(reply[1])
                    if channel is not None and channel.members:
                        frame = Frame.from_announcement(reply[2])
                        for sub in channel.members:
                            sub._offer(frame, now)
                        self.stats.offered += len(channel.members)
                else:
                    self._acknowledge(reply)

    def _acknowledge(self, reply: object) -> None:
        if not self._acks:
            raise PubSubError(f"unexpected reply on the hub's connection: {reply!r}")
        expected = self._acks.popleft()
        if isinstance(expected, _Channel):
            expected.confirmed.set()
        elif expected in (_READY, _PONG) and not self._connected.is_set():
            self._connected.set()
            if expected == _READY:
                self.reconnects += 1
                logger.info("event hub reconnected; %d subscribers catch up", len(self._subs))
                for sub in list(self._subs):
                    sub._request_resync()

    async def _tick_loop(self) -> None:
        next_ping = anyio.current_time() + self._ping
        while True:
            await anyio.sleep(self._tick)
            now = anyio.current_time()
            for sub in list(self._subs):
                sub._tick(now)
            if now >= next_ping and self._conn is not None and self._connected.is_set():
                next_ping = now + self._ping
                self._queue_command(encode_command("PING"), [_PONG])

    def __repr__(self) -> str:
        return (
            f"EventHub(prefix={self._prefix!r}, channels={len(self._channels)}, "
            f"subscribers={len(self._subs)})"
        )
