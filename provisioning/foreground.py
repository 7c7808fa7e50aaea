"""Giving way to the work a customer is waiting on, in the same process.

Provisioning shares its process, its database server and, on a small machine, its CPU with
the webhook intake. When a burst of payments arrives, the first operations' steps (CREATE
DATABASE, TLS handshakes) competed with the rest of the burst being stored and announced, and
tripled the time from a payment to its `operation.started`. An operation taking its slot now
waits, for a bounded time, until the foreground is quiet: the steps are throughput work, the
announcement is what the customer watches.
"""

from __future__ import annotations

from typing import Protocol

import anyio

__all__ = ["Foreground", "give_way"]


class Foreground(Protocol):
    """Latency-critical work that provisioning steps give way to (the webhook intake)."""

    async def quiet(self) -> None:
        """Returns once no such work is waiting."""


async def give_way(foreground: Foreground | None, *, at_most: float) -> None:
    """Waits until ``foreground`` is quiet, or ``at_most`` seconds under sustained load, so
    that provisioning is slowed by a burst but never starved by it."""
    if foreground is None:
        return
    with anyio.move_on_after(at_most):
        await foreground.quiet()
