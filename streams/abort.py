"""Cancelling one task from callbacks, for the price of a few attributes."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

__all__ = ["TaskAborter"]

_AGAIN_SECONDS = 0.05


class TaskAborter:
    """``with TaskAborter() as aborter:`` in a task; ``aborter.abort()`` from anywhere in the
    loop cancels that task, and the block absorbs the cancellation it caused.

    A cancel scope or task group would do, at about a kilobyte per connection; this is what an
    SSE stream needs of them. Like anyio's scopes it repeats the cancellation until the block
    has ended, because some libraries swallow one (redis-py 8.1 does, at times, mid-command).
    """

    __slots__ = ("_again", "_cancelling", "_task", "aborted")

    def __init__(self) -> None:
        self._task: asyncio.Task[Any] | None = None
        self._cancelling = 0
        self._again: asyncio.TimerHandle | None = None
        self.aborted = False

    def __enter__(self) -> TaskAborter:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("TaskAborter needs a running asyncio task")
        self._task, self._cancelling = task, task.cancelling()
        return self

    def abort(self) -> None:
        task = self._task
        if task is None:
            return
        self.aborted = True
        task.cancel()
        if self._again is not None:
            self._again.cancel()
        self._again = asyncio.get_running_loop().call_later(_AGAIN_SECONDS, self.abort)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        task, self._task = self._task, None
        if self._again is not None:
            self._again.cancel()
            self._again = None
        if task is None or not self.aborted:
            return False
        while task.cancelling() > self._cancelling:
            task.uncancel()
        return exc_type is asyncio.CancelledError
