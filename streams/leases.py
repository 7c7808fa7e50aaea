"""Per-user limit of concurrent streams across every instance, with leases that expire.

Each open stream holds a member of a Redis sorted set per user, scored with its expiry (Redis
time, so instance clocks do not matter). A process renews its own leases in one batch; if it
dies, its leases lapse after ``ttl_seconds`` and stop counting.
"""

from __future__ import annotations

import logging
import math
import secrets
from typing import Final

import anyio
import anyio.abc
from redis.crc import key_slot
from redis.exceptions import RedisError

from .cluster import RedisClient, is_cluster
from .scripts import LuaScript

__all__ = ["StreamLease", "StreamLeases", "TooManyStreams"]

logger = logging.getLogger(__name__)

_RENEW_BATCH: Final = 1000


class TooManyStreams(Exception):
    """The user has as many open streams as allowed; answer 429 with ``Retry-After``."""

    def __init__(self, user_id: str, limit: int, retry_after: int) -> None:
        super().__init__(
            f"user {user_id} already has {limit} open event streams; close one or retry in "
            f"{retry_after} s"
        )
        self.user_id = user_id
        self.limit = limit
        self.retry_after = retry_after


class StreamLease:
    """One open stream's place in its user's limit; ``release()`` when the stream ends."""

    __slots__ = ("_owner", "key", "member", "user_id")

    def __init__(self, owner: StreamLeases, user_id: str, key: str, member: str) -> None:
        self._owner = owner
        self.user_id = user_id
        self.key = key
        self.member = member

    async def release(self) -> None:
        await self._owner._release(self)


class StreamLeases:
    """Acquire leases with ``acquire``; run ``run()`` in the lifespan task group to renew them."""

    def __init__(
        self,
        redis: RedisClient,
        *,
        prefix: str = "lookout:",
        limit: int = 10,
        ttl_seconds: float = 30.0,
    ) -> None:
        if limit < 1:
            raise ValueError(f"a limit of {limit} streams per user refuses every stream; give 1+")
        self._redis = redis
        self._prefix = prefix
        self.limit = limit
        self._ttl_ms = max(int(ttl_seconds * 1000), 1000)
        self._acquire = LuaScript(redis, "lease_acquire.lua")
        self._renew = LuaScript(redis, "lease_renew.lua")
        self._instance = secrets.token_hex(6)
        self._held: dict[StreamLease, None] = {}

    def _key(self, user_id: str) -> str:
        return f"{self._prefix}stream-leases:{user_id}"

    @property
    def held(self) -> int:
        """Leases this process holds."""
        return len(self._held)

    async def acquire(self, user_id: str) -> StreamLease:
        """A lease for one more stream of ``user_id``; raises TooManyStreams over the limit."""
        key = self._key(user_id)
        member = f"{self._instance}:{secrets.token_hex(8)}"
        granted, retry_ms = await self._acquire(keys=[key], args=[self._ttl_ms, self.limit, member])
        if not int(granted):
            raise TooManyStreams(user_id, self.limit, max(1, math.ceil(int(retry_ms) / 1000)))
        lease = StreamLease(self, user_id, key, member)
        self._held[lease] = None
        return lease

    async def count(self, user_id: str) -> int:
        """Streams of ``user_id`` open now, on every instance (lapsed leases excluded)."""
        seconds, micros = await self._redis.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        return int(await self._redis.zcount(self._key(user_id), f"({now_ms}", "+inf"))

    async def _release(self, lease: StreamLease) -> None:
        if lease in self._held:  # releasing twice is harmless
            del self._held[lease]
            await self._redis.zrem(lease.key, lease.member)

    async def renew(self) -> None:
        """Push every held lease's expiry ``ttl_seconds`` ahead."""
        groups = [list(self._held)]
        if is_cluster(self._redis):
            # A script's keys must share a slot there: one batch per slot of the users' sets.
            by_slot: dict[int, list[StreamLease]] = {}
            for lease in self._held:
                by_slot.setdefault(key_slot(lease.key.encode()), []).append(lease)
            groups = list(by_slot.values())
        for held in groups:
            for start in range(0, len(held), _RENEW_BATCH):
                batch = held[start : start + _RENEW_BATCH]
                await self._renew(
                    keys=[lease.key for lease in batch],
                    args=[self._ttl_ms, *(lease.member for lease in batch)],
                )

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Renew held leases three times per ``ttl_seconds`` until cancelled."""
        task_status.started()
        while True:
            await anyio.sleep(self._ttl_ms / 3000)
            try:
                await self.renew()
            except (RedisError, OSError, TimeoutError) as exc:
                # Leases lapse after the ttl if Redis stays away: streams then count less.
                logger.warning("could not renew %d stream leases: %s", len(self._held), exc)
