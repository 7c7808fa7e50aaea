"""Retries with exponential backoff and jitter, for transient errors only."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from .errors import is_transient

__all__ = ["RetryPolicy"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _logger_for(what: str) -> Callable[[RetryCallState], None]:
    def log(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        # The class name only: an asyncpg message can quote a DSN or a statement.
        logger.warning(
            "transient %s in %s (attempt %d); retrying in %.2fs",
            type(exc).__name__,
            what,
            state.attempt_number,
            state.upcoming_sleep,
        )

    return log


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``attempts`` tries in all, waiting ``initial_delay`` * 2^n (plus jitter, at most
    ``max_delay``) between them.

    A provisioning step whose server still does not answer after ``attempts`` tries is not
    failed: its operation waits (``operation.waiting``) and tries again every
    ``outage_max_delay`` seconds at most, and fails only ``outage_window`` seconds after the
    outage began (the caller sets it: an operator's setting).
    """

    attempts: int = 5
    initial_delay: float = 0.5
    max_delay: float = 8.0
    outage_window: float = 900.0
    outage_max_delay: float = 5.0

    def delay(self, failures: int) -> float:
        """The pause after ``failures`` failed tries in a row (1 for the first)."""
        base = self.initial_delay * 2.0 ** min(failures - 1, 30)
        return min(base + random.uniform(0, self.initial_delay), self.max_delay)

    def outage_delay(self, waits: int) -> float:
        """The pause before the next try of a waiting operation (``waits`` 1 for the first)."""
        return min(self.max_delay * 2.0 ** min(waits - 1, 30), self.outage_max_delay)

    async def call(self, fn: Callable[[], Awaitable[T]], *, what: str) -> T:
        """Runs ``fn``, retrying transient errors; raises the last error when they run out."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.attempts),
            wait=wait_exponential_jitter(
                multiplier=self.initial_delay, max=self.max_delay, jitter=self.initial_delay
            ),
            retry=retry_if_exception(is_transient),
            sleep=anyio.sleep,
            before_sleep=_logger_for(what),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await fn()
        raise AssertionError("unreachable: tenacity reraises the last error")  # pragma: no cover
