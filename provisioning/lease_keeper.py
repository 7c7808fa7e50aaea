"""Renewing the leases of every operation one instance holds, in one statement.

Each operation used to renew its own lease: a burst of 100 operations waiting for a slot
made 20 renewals a second, each a pooled connection and a round trip. One keeper per instance
renews them all at once every third of a lease.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import anyio
import asyncpg

from .errors import DATABASE_ERRORS
from .operations import Connection, lease_until

__all__ = ["LeaseKeeper", "renew_leases"]

logger = logging.getLogger(__name__)


async def renew_leases(
    conn: Connection,
    op_ids: list[str],
    owner: str,
    lease_seconds: float,
) -> dict[str, bool]:
    """Extends the leases ``owner`` still holds; answers ``cancel_requested`` of each of them
    (an operation missing from the answer lost its lease)."""
    rows = await conn.fetch(
        f"UPDATE operations SET lease_expires_at = {lease_until(3)}"
        " WHERE id = ANY($1::text[]) AND lease_owner = $2 AND finalized_at IS NULL"
        " RETURNING id, cancel_requested",
        op_ids,
        owner,
        lease_seconds,
    )
    return {row["id"]: row["cancel_requested"] for row in rows}


@dataclass(eq=False)
class _Kept:
    on_cancel_requested: Callable[[], None]
    on_lost: Callable[[], None]
    renewed_at: float
    cancel_seen: bool = False


class LeaseKeeper:
    """Keeps the leases of the operations registered with ``keeping`` while ``run`` serves.

    Calls an operation's ``on_cancel_requested`` (once) when another instance asked for a
    cancellation, and ``on_lost`` when its lease went to another instance, or could not be
    renewed for a whole lease (someone else may have it by then).
    """

    def __init__(self, pool: asyncpg.Pool, owner: str, lease_seconds: float) -> None:
        self._pool = pool
        self._owner = owner
        self._lease_seconds = lease_seconds
        self._kept: dict[str, _Kept] = {}

    @contextlib.contextmanager
    def keeping(
        self,
        op_id: str,
        *,
        on_cancel_requested: Callable[[], None],
        on_lost: Callable[[], None],
    ) -> Iterator[None]:
        """The operation's lease was just taken: it is renewed until the block ends."""
        self._kept[op_id] = _Kept(on_cancel_requested, on_lost, anyio.current_time())
        try:
            yield
        finally:
            self._kept.pop(op_id, None)

    async def run(self) -> None:
        while True:
            await anyio.sleep(self._lease_seconds / 3)
            await self.renew()

    async def renew(self) -> None:
        """Renews every lease kept, once."""
        kept = dict(self._kept)
        if not kept:
            return
        # Bounded, so that a pool or a server that does not answer is seen within a renewal
        # period rather than never.
        try:
            with anyio.fail_after(self._lease_seconds / 3):
                async with self._pool.acquire() as conn:
                    held = await renew_leases(conn, list(kept), self._owner, self._lease_seconds)
        except DATABASE_ERRORS as exc:
            logger.warning("%d leases not renewed (%s)", len(kept), type(exc).__name__)
            now = anyio.current_time()
            for op_id, lease in kept.items():
                if now - lease.renewed_at >= self._lease_seconds:
                    self._lose(op_id, lease)
            return
        now = anyio.current_time()
        for op_id, lease in kept.items():
            if op_id not in held:
                self._lose(op_id, lease)
                continue
            lease.renewed_at = now
            if held[op_id] and not lease.cancel_seen:
                lease.cancel_seen = True
                logger.info("operation %s: cancellation requested", op_id)
                lease.on_cancel_requested()

    def _lose(self, op_id: str, lease: _Kept) -> None:
        self._kept.pop(op_id, None)
        lease.on_lost()
