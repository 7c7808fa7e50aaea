"""The event loop's lag, measured, and its stalls named.

Everything a process serves runs on one event loop: a call that blocks it (a slow
synchronous function, a large JSON document, a garbage-collector pass) delays every request
and every stream of the process at once, and shows on the client side only as a tail of
unexplained latency. ``LoopLagMonitor.run`` asks the loop to wake it every ``TICK_SECONDS``
and records how late each wake-up was (`lookout_event_loop_lag_seconds`).

A late tick says a stall happened, not what caused it: by then the blocking call has
returned. So, while this module logs at debug level (``LOOKOUT_LOG_LEVEL=debug``), a
watchdog thread looks at the loop's thread whenever the loop has not ticked for
``STALL_SECONDS`` past its due time, and takes that thread's stack *during* the stall
(``sys._current_frames``); the tick that ends the stall logs it, naming the blocking call.
The watchdog wakes every tick and reads a float; it takes the stack only in a stall.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable

import anyio

__all__ = ["STALL_SECONDS", "TICK_SECONDS", "LoopLagMonitor"]

logger = logging.getLogger(__name__)

TICK_SECONDS = 0.010
# A stall this long is worth a stack in the log: twice the webhook acknowledgement's p99 goal.
STALL_SECONDS = 0.050


class LoopLagMonitor:
    """``observe(seconds)`` is called with the lag of every tick (0 when on time)."""

    def __init__(
        self,
        observe: Callable[[float], None],
        *,
        tick: float = TICK_SECONDS,
        stall: float = STALL_SECONDS,
    ) -> None:
        if tick <= 0 or stall <= 0:
            raise ValueError("LoopLagMonitor needs tick > 0 and stall > 0")
        self._observe = observe
        self._tick = tick
        self._stall = stall

    async def run(self) -> None:
        """Ticks until cancelled; run it under the app's supervisor, on the loop it watches."""
        watchdog: _Watchdog | None = None
        if logger.isEnabledFor(logging.DEBUG):
            watchdog = _Watchdog(threading.get_ident(), due_after=self._tick + self._stall)
            watchdog.start()
        try:
            while True:
                expected = time.monotonic() + self._tick
                await anyio.sleep(self._tick)
                now = time.monotonic()
                lag = max(0.0, now - expected)
                self._observe(lag)
                if watchdog is None:
                    continue
                watchdog.ticked(now)
                stack = watchdog.take_stack()
                if lag >= self._stall:
                    logger.debug(
                        "the event loop stalled for %.0f ms; its thread was in:\n%s",
                        lag * 1000,
                        stack or "(no sample: the stall ended before the watchdog looked)\n",
                    )
        finally:
            if watchdog is not None:
                watchdog.stop()


class _Watchdog(threading.Thread):
    """Samples the stack of thread ``target`` once the loop has not ticked for ``due_after``."""

    def __init__(self, target: int, *, due_after: float) -> None:
        super().__init__(name="loop-lag-watchdog", daemon=True)
        self._target = target
        self._due_after = due_after
        # Written by the loop's thread, read by this one: a float, swapped whole under the GIL.
        self._last_tick = time.monotonic()
        self._stack: str | None = None
        self._stopped = threading.Event()

    def ticked(self, now: float) -> None:
        self._last_tick = now

    def take_stack(self) -> str | None:
        """The stack sampled since the last tick, if any; a stale one is dropped."""
        stack, self._stack = self._stack, None
        return stack

    def stop(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        period = self._due_after / 6
        sampled_for = -1.0
        while not self._stopped.wait(period):
            last = self._last_tick
            if last == sampled_for or time.monotonic() - last < self._due_after:
                continue
            frame = sys._current_frames().get(self._target)
            if frame is None:
                continue
            try:
                self._stack = "".join(traceback.format_stack(frame))
            finally:
                del frame  # a frame held here would keep the loop's locals alive
            sampled_for = last  # one sample per stall: its start names the call
