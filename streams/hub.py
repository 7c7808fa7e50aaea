"""The per-process hub: one Redis pub/sub connection (one per primary of a Redis Cluster),
fanned out to every local client.

Here, together because they share one state (encode/broadcaster's ``_base.py``): the channel
table (a channel is wanted while one local client is on it), each client's bounded mailbox
(``Subscription``), the fan-out of what arrives, the ticker behind keep-alives, duration limits
and pings, and starting and stopping. Keeping the channels subscribed on Redis, across
reconnects, is the backend's (``backend.HubBackend``: by default ``link.RedisLink``, or
``cluster.ClusterLink`` for a cluster client).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from types import TracebackType

import anyio
import anyio.abc
from redis.asyncio.cluster import RedisCluster

from .backend import ChannelHandle, HubBackend
from .cluster import ClusterLink, RedisClient
from .frames import Frame
from .history import StreamHistory
from .link import RedisLink
from .pubsub import RedisEndpoint
from .topics import channel_name

__all__ = ["EventHub", "HubClosed", "HubStats", "Signal", "Subscription"]

logger = logging.getLogger(__name__)


class HubClosed(RuntimeError):
    """The hub is shutting down; open the stream on another instance."""


class Signal(enum.Enum):
    """What a subscriber gets instead of frames."""

    RESYNC = "resync"  # pub/sub was re-established: catch up from the Stream
    IDLE = "idle"  # nothing was delivered for the keep-alive interval
    RECHECK = "recheck"  # time to ask again whether the client may still listen
    EXPIRED = "expired"  # the maximum stream duration has passed (terminal)
    OVERFLOW = "overflow"  # the client fell a full queue behind (terminal)
    CLOSED = "closed"  # the hub is shutting down (terminal)


class Subscription:
    """One client's interest in one topic, created by ``EventHub.subscribe``.

    Use as ``async with hub.subscribe(topic) as sub:`` (waits until Redis confirmed the
    channel, and unsubscribes on exit), then ``await sub.receive()`` in a loop.
    """

    __slots__ = (
        "_channel",
        "_deadline",
        "_idle",
        "_idle_after",
        "_last",
        "_maxsize",
        "_next_recheck",
        "_queue",
        "_recheck",
        "_recheck_every",
        "_release",
        "_resync",
        "_state",
        "_waiter",
        "on_terminal",
        "topic",
    )

    def __init__(
        self,
        topic: str,
        channel: Channel,
        release: Callable[[Subscription], None],
        *,
        maxsize: int,
        idle_after: float,
        deadline: float | None,
        now: float,
        recheck_every: float | None = None,
    ) -> None:
        self.topic = topic
        self._channel = channel
        self._release: Callable[[Subscription], None] | None = release
        # A list, not a deque: always drained whole, and an empty deque costs 600 bytes.
        self._queue: list[Frame] = []
        self._maxsize = maxsize
        self._waiter: asyncio.Future[None] | None = None
        self._state: Signal | None = None
        self._resync = False
        self._idle = False
        self._idle_after = idle_after
        self._deadline = deadline
        self._last = now
        self._recheck_every = recheck_every
        self._next_recheck = None if recheck_every is None else now + recheck_every
        self._recheck = False
        # Called once when the subscription ends for a reason of the hub's (overflow, expiry,
        # shutdown), so that a writer blocked on a slow socket can be cancelled.
        self.on_terminal: Callable[[Signal], None] | None = None

    @property
    def state(self) -> Signal | None:
        """The terminal signal, once there is one."""
        return self._state

    async def ready(self) -> None:
        """Wait until Redis has confirmed the subscription (so a history read misses nothing)."""
        await self._channel.confirmed.wait()

    async def receive(self) -> list[Frame] | Signal:
        """Every frame queued so far, in order; or a signal. Terminal signals repeat."""
        while True:
            if self._state is not None:
                return self._state
            if self._resync:
                self._resync = False
                return Signal.RESYNC
            if self._recheck:
                self._recheck = False
                return Signal.RECHECK
            if self._queue:
                batch, self._queue = self._queue, []
                return batch
            if self._idle:
                self._idle = False
                return Signal.IDLE
            # A bare future: the wake-up of every delivery, so the cheapest primitive there is
            # (anyio.Event costs three objects per wait). Lookout runs on asyncio only.
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            await waiter

    def close(self) -> None:
        """Leave the topic; the last local subscriber leaving unsubscribes the channel."""
        release, self._release = self._release, None
        if release is not None:
            release(self)
        self._queue.clear()

    async def __aenter__(self) -> Subscription:
        try:
            await self.ready()
        except BaseException:
            self.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    # The hub's side. Plain methods, no awaits: fan-out is one synchronous loop.

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # done: its reader was cancelled
                waiter.set_result(None)

    def _offer(self, frame: Frame, now: float) -> None:
        if self._state is not None:
            return
        if len(self._queue) >= self._maxsize:
            self._terminate(Signal.OVERFLOW)
            return
        self._queue.append(frame)
        self._last = now
        self._wake()

    def _request_resync(self) -> None:
        if self._state is None:
            self._resync = True
            self._wake()

    def _tick(self, now: float) -> None:
        if self._state is not None:
            return
        if self._deadline is not None and now >= self._deadline:
            self._terminate(Signal.EXPIRED)
            return
        if self._next_recheck is not None and now >= self._next_recheck:
            assert self._recheck_every is not None
            self._next_recheck = now + self._recheck_every
            self._recheck = True
            self._wake()
        if now - self._last >= self._idle_after:
            self._last = now
            self._idle = True
            self._wake()

    def _terminate(self, signal: Signal) -> None:
        if self._state is not None:
            return
        self._state = signal
        self._queue.clear()
        self._wake()
        callback = self.on_terminal
        if callback is not None:
            callback(signal)


class Channel:
    """A channel local clients want: ``subs`` counts them, ``members`` is ``subs`` frozen for
    the fan-out, which then neither copies it nor trips over a change."""

    __slots__ = ("confirmed", "members", "name", "subs")

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.subs: dict[Subscription, None] = {}
        self.members: tuple[Subscription, ...] = ()
        self.confirmed = anyio.Event()


def _members(channel: ChannelHandle) -> tuple[Subscription, ...]:
    assert isinstance(channel, Channel)
    return channel.members


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
    ``terminal_types``: the event types that end a topic, in the caller's vocabulary (the
    publisher's must be the same); ``backend``: another transport than Redis pub/sub.
    """

    def __init__(
        self,
        redis: RedisClient,
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
        backend: HubBackend | None = None,
        terminal_types: Collection[str] = frozenset(),
    ) -> None:
        self._prefix = prefix
        self.name = name
        self._shutdown = shutdown
        self._queue_size = queue_size
        self._tick = tick_seconds
        self._ping = ping_seconds
        self.history = StreamHistory(
            redis, prefix=prefix, concurrency=history_concurrency, terminal_types=terminal_types
        )
        self._terminal = frozenset(t.encode() for t in terminal_types)
        self._channels: dict[bytes, Channel] = {}
        self._subs: dict[Subscription, None] = {}
        self._closed = False
        self._scope: anyio.CancelScope | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self.reconnects = 0
        self.stats = HubStats()
        self._link: HubBackend
        if backend is not None:
            self._link = backend
        elif isinstance(redis, RedisCluster):
            self._link = ClusterLink(
                redis, name=name, ping_seconds=ping_seconds, backoff=(backoff_min, backoff_max)
            )
        else:
            self._link = RedisLink(
                endpoint or RedisEndpoint.from_client(redis),
                name=name,
                ping_seconds=ping_seconds,
                backoff=(backoff_min, backoff_max),
            )

    @property
    def connected(self) -> bool:
        return self._link.connected

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
        for channel in self._channels.values():
            channel.confirmed.set()  # nobody waits for a subscription that will not come
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
                    await self._link.run(self)
                    tg.cancel_scope.cancel()
        finally:
            # A supervisor may run it again after a crash.
            self._scope = None

    async def _close_on(self, event: anyio.Event) -> None:
        await event.wait()
        self.close()

    # The backend's listener (``backend.BackendListener``): called on the read path.

    def channels(self) -> list[Channel]:
        return list(self._channels.values())

    def confirmed(self, channel: ChannelHandle) -> None:
        assert isinstance(channel, Channel)
        channel.confirmed.set()

    def deliver(self, name: bytes, payload: bytes, now: float) -> None:
        channel = self._channels.get(name)
        if channel is None or not channel.members:
            return  # unsubscribed meanwhile: the UNSUBSCRIBE is on its way
        try:
            frame = Frame.from_announcement(payload, self._terminal)
        except (ValueError, TypeError) as exc:
            self.skipped(str(exc), (name, payload))
            return
        for sub in channel.members:
            sub._offer(frame, now)
        self.stats.offered += len(channel.members)

    def skipped(self, why: str, detail: object) -> None:
        # Someone PUBLISHed on a Lookout channel by hand, or an instance of another version
        # did: one bad message must not end every stream of the process.
        self.stats.malformed += 1
        logger.warning("event hub skipped a malformed pub/sub message (%s): %.200r", why, detail)

    def resynced(self, channels: Collection[ChannelHandle]) -> None:
        # The link is back after a gap: what was published meanwhile is only in the Streams.
        self.reconnects += 1
        subs = [sub for channel in channels for sub in _members(channel)]
        logger.info("event hub resubscribed; %d subscribers catch up", len(subs))
        for sub in subs:
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
