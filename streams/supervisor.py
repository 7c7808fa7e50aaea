"""Keeps a process's long-running loops alive: a crash is logged, counted and restarted.

A background loop that raises used to take the whole lifespan task group down with it (the
pool and clients closed, while the server went on answering). Under a ``Supervisor`` each loop
is restarted with capped exponential backoff; a loop that crashes ``max_crashes`` times within
``window_seconds`` is reported by ``failing()`` until it has stayed up for a whole window, so
that health checks can ask an orchestrator to restart the process. A loop that returns before
``stop()`` is a crash too: it was meant to serve until cancelled, and one that ends quietly
is the zombie this prevents. Cancellation always passes through. Nothing here knows HTTP or
metrics: callers read ``restarts`` and ``failing()``.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import anyio.abc

__all__ = ["StartingLoop", "Supervisor", "TaskFailure"]

logger = logging.getLogger(__name__)


class StartingLoop(Protocol):
    """A loop that reports when it is ready, as ``TaskGroup.start`` expects (``hub.run``)."""

    def __call__(self, *, task_status: anyio.abc.TaskStatus[None]) -> Awaitable[None]: ...


@dataclass(frozen=True, slots=True)
class TaskFailure:
    """A supervised loop that cannot stay up: what health checks report."""

    task: str
    crashes: int  # within the window
    window_seconds: float
    last_error: str

    @property
    def message(self) -> str:
        return (
            f"background task {self.task!r} crashed {self.crashes} times within "
            f"{self.window_seconds:g} s (last: {self.last_error}); restart the process"
        )


@dataclass(slots=True)
class _TaskState:
    crashes: deque[float] = field(default_factory=deque)
    restarts: int = 0
    failing_since: float | None = None
    running_since: float | None = None
    last_error: str = ""
    active: bool = False


class _Relay:
    """Hands the first ``started()`` of any attempt to the starter; later ones are no-ops."""

    def __init__(self, outer: anyio.abc.TaskStatus[None]) -> None:
        self._outer = outer
        self.done = False

    def started(self, value: None = None) -> None:
        if not self.done:
            self.done = True
            self._outer.started()


class Supervisor:
    """Runs loops with ``run`` (plain) or ``run_starting`` (``task_status``) in a task group.

    ``tg.start_soon(supervisor.run, "webhook-inbox", inbox.run)`` or
    ``await tg.start(supervisor.run_starting, "event-hub", hub.run)``. A loop that raises an
    ``Exception``, or returns before ``stop()``, is restarted after ``backoff_min`` doubling
    up to ``backoff_max`` seconds (reset once an attempt has stayed up for
    ``window_seconds``); after ``stop()`` a loop that returns is finished.
    """

    def __init__(
        self,
        *,
        max_crashes: int = 5,
        window_seconds: float = 60.0,
        backoff_min: float = 0.1,
        backoff_max: float = 30.0,
    ) -> None:
        if max_crashes < 1 or window_seconds <= 0 or backoff_min < 0 or backoff_max < backoff_min:
            raise ValueError(
                "Supervisor needs max_crashes >= 1, window_seconds > 0 and "
                "0 <= backoff_min <= backoff_max"
            )
        self._max_crashes = max_crashes
        self._window = window_seconds
        self._backoff = (backoff_min, backoff_max)
        self._tasks: dict[str, _TaskState] = {}
        self._stopping = False

    def stop(self) -> None:
        """The process is shutting down: from now on a loop that returns (the hub once
        closed) has finished, and is not restarted."""
        self._stopping = True

    @property
    def restarts(self) -> Mapping[str, int]:
        """Restarts after a crash, by task name, since the process started."""
        return {name: state.restarts for name, state in self._tasks.items()}

    def failing(self) -> list[TaskFailure]:
        """The loops that crashed ``max_crashes`` times within the window and have not stayed
        up for a whole window since."""
        now = anyio.current_time()
        found = []
        for name, state in self._tasks.items():
            if state.failing_since is None:
                continue
            if state.running_since is not None and now - state.running_since >= self._window:
                state.failing_since = None  # up for a whole window again: healthy
                continue
            found.append(
                TaskFailure(name, len(state.crashes), self._window, state.last_error or "?")
            )
        return found

    async def run(
        self,
        name: str,
        loop: Callable[[], Awaitable[None]],
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Runs ``loop()``, restarting it after each crash, until it returns after ``stop()``;
        reports started at once."""
        task_status.started()

        async def attempt(relay: _Relay) -> None:
            await loop()

        await self._supervise(name, attempt, _Relay(anyio.TASK_STATUS_IGNORED))

    async def run_starting(
        self,
        name: str,
        loop: StartingLoop,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Runs ``loop(task_status=...)``: the starter is released by the first attempt that
        reports started; a crash before then is restarted like any other."""
        relay = _Relay(task_status)

        async def attempt(relay: _Relay) -> None:
            await loop(task_status=relay)

        await self._supervise(name, attempt, relay)

    async def _supervise(
        self, name: str, attempt: Callable[[_Relay], Awaitable[None]], relay: _Relay
    ) -> None:
        # A name keeps its history across runs (a restarted parent supervises its children
        # again), but two loops at once under one name would blur whose crashes are counted.
        state = self._tasks.setdefault(name, _TaskState())
        if state.active:
            raise ValueError(f"a task named {name!r} is already supervised; name each loop once")
        state.active = True
        delay = self._backoff[0]
        try:
            while True:
                started = state.running_since = anyio.current_time()
                try:
                    await attempt(relay)
                except Exception as exc:
                    # The boundary of a background task: anything it did not handle itself is
                    # a bug or an outage it did not expect; keep the process serving.
                    # (Cancellation is not an Exception and passes through.)
                    crash: Exception | None = exc
                else:
                    if self._stopping:
                        if not relay.done:
                            relay.started()  # a loop with nothing to do: release its starter
                        return
                    crash = None
                state.running_since = None
                if anyio.current_time() - started >= self._window:
                    delay = self._backoff[0]  # it had stayed up for a whole window
                self._count_crash(name, state, crash, delay)
                await anyio.sleep(delay)
                delay = min(max(delay * 2, self._backoff[0]), self._backoff[1])
        finally:
            state.running_since = None
            state.active = False

    def _count_crash(
        self, name: str, state: _TaskState, crash: Exception | None, delay: float
    ) -> None:
        """Counts and logs a crash (``crash``, or None: the loop returned before ``stop()``)."""
        now = anyio.current_time()
        state.crashes.append(now)
        while state.crashes and now - state.crashes[0] > self._window:
            state.crashes.popleft()
        state.restarts += 1
        # A loop returns only when asked to stop: one that returns by itself (a stray
        # `return` or `break`, a swallowed cancellation) would leave its work undone for
        # good while health checks say ok.
        what = _describe(crash) if crash is not None else "returned without being stopped"
        state.last_error = what[:500]
        if len(state.crashes) >= self._max_crashes:
            if state.failing_since is None:
                state.failing_since = now
            logger.error(
                "background task %r crashed %d times within %g s (%s); "
                "restarting in %.3g s, reported as failing",
                name,
                len(state.crashes),
                self._window,
                what,
                delay,
                exc_info=crash,
            )
        else:
            logger.error(
                "background task %r crashed (%s); restarting in %.3g s",
                name,
                what,
                delay,
                exc_info=crash,
            )


def _describe(exc: BaseException) -> str:
    """What went wrong, in a line; a task group's wrapper gives way to what it wraps."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(inner) for inner in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"
