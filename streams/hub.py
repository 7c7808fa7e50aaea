"""The per-process hub: one Redis pub/sub connection, fanned out to every local client.

Here: the clients' subscriptions and the channels they hold (a channel is wanted while one
local client is on it), the ticker behind keep-alives, duration limits and pings, and starting
and stopping. Keeping those channels subscribed on Redis, across reconnects, is ``link``'s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import TracebackType

import anyio
import anyio.abc
from redis.asyncio import Redis

from .history import StreamHistory
from .link import Channel, HubLink
from .pubsub import RedisEndpoint
from .subscription import Signal, Subscription
from .topics import channel_name

__all__ = ["EventHub", "HubClosed", "HubStats"]

logger = logging.getLogger(__name__)


class HubClosed(RuntimeError):
    """The hub is shutting down; open the stream on another instance."""


@dataclass(slots=True)
class HubStats:
    """Running totals for metrics: plain integers, bumped on the fan-out path."""

    offered: int = 0  # frames handed to client queues
    slow_clients_dropped: int = 0  # clients cut off because their queue was full
    malformed: int = 0  # pub/sub messages skipped because they were not announcements


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
        self._queue_size = queue_size
        self._tick = tick_seconds
        self._ping = ping_seconds
        self.history = StreamHistory(redis, prefix=prefix, concurrency=history_concurrency)
        self._channels: dict[bytes, Channel] = {}
        self._subs: dict[Subscription, None] = {}
        self._closed = False
        self._scope: anyio.CancelScope | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self.reconnects = 0
        self.stats = HubStats()
        self._link = HubLink(
            endpoint or RedisEndpoint.from_client(redis),
            self._channels,
            self.stats,
            name=name,
            ping_seconds=ping_seconds,
            backoff=(backoff_min, backoff_max),
            on_resync=self._resync,
        )

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def connected(self) -> bool:
        return self._link.connected

    @property
    def closed(self) -> bool:
        return self._closed

    def subscriber_count(self, topic: str | None = None) -> int:
        if topic is None:
            return len(self._subs)
        channel = self._channels.get(channel_name(self._prefix, topic).encode())
        return 0 if channel is None else len(channel.subs)

    async def wait_connected(self) -> None:
        await self._link.wait_connected()

    def subscribe(
        self,
        topic: str,
        *,
        keepalive: float = 15.0,
        max_seconds: float | None = None,
        recheck_seconds: float | None = None,
    ) -> Subscription:
        """A subscription to ``topic``; ``await sub.ready()`` (or ``async with``) before reading
        history. ``keepalive``: idle seconds before ``Signal.IDLE``; ``max_seconds``: lifetime
        before ``Signal.EXPIRED``; ``recheck_seconds``: period of ``Signal.RECHECK``."""
        if self._closed:
            raise HubClosed("the event hub is shutting down; reconnect to another instance")
        name = channel_name(self._prefix, topic).encode()
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = Channel(name)
            self._link.subscribe(channel)
        now = anyio.current_time()
        sub = Subscription(
            topic,
            channel,
            self._release,
            maxsize=self._queue_size,
            idle_after=max(keepalive - self._tick, 0.0),
            deadline=None if max_seconds is None else now + max_seconds,
            now=now,
            recheck_every=recheck_seconds,
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
            self._link.unsubscribe(channel.name)

    def close(self) -> None:
        """Tell every subscriber ``Signal.CLOSED`` and stop. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subs):
            sub._terminate(Signal.CLOSED)
        self._link.close()
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
        try:
            with anyio.CancelScope() as scope:
                self._scope = scope
                if self._closed:
                    scope.cancel()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._tick_loop)
                    if self._shutdown is not None:
                        tg.start_soon(self._close_on, self._shutdown)
                    task_status.started()
                    await self._link.run()
                    tg.cancel_scope.cancel()
        finally:
            # A supervisor may run it again after a crash.
            self._scope = None

    async def _close_on(self, event: anyio.Event) -> None:
        await event.wait()
        self.close()

    def _resync(self) -> None:
        # The link is back after a gap: what was published meanwhile is only in the Streams.
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
            if now >= next_ping and self._link.live:
                next_ping = now + self._ping
                self._link.ping()

    def __repr__(self) -> str:
        return (
            f"EventHub(prefix={self._prefix!r}, channels={len(self._channels)}, "
            f"subscribers={len(self._subs)})"
        )
