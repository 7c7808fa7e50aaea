"""A client's bounded mailbox on the hub: frames in, batches or signals out."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from typing import TYPE_CHECKING

from .frames import Frame

if TYPE_CHECKING:
    from .link import Channel

__all__ = ["Signal", "Subscription"]


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
