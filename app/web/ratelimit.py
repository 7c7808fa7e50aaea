"""Rate limits per user (per IP when anonymous) and per category, shared by all instances
through Redis (the `limits` library: its moving window answers the real time to reset).

Billing and checkout are generous ("never block a paying customer") but still bounded; if
Redis cannot be asked, the request goes through rather than failing a customer.

An identity whose window is full is remembered in the process until the window frees a slot:
its next requests are refused without asking Redis, and `refuse_if_full` lets a route refuse
before the work the limit protects (the API key's database lookup). This is exact, not a
cache that may go stale: in a moving window no slot frees before its oldest hit expires,
whatever other instances count meanwhile.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from limits import RateLimitItem, parse
from limits.aio.storage import RedisClusterStorage, RedisStorage
from limits.aio.storage.redis.redispy import RedispyBridge
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.web.errors import APIError
from streams import RedisClient

__all__ = ["LIMITS", "RateLimitMiddleware", "RateLimits", "category_for"]

logger = logging.getLogger(__name__)

LIMITS: Final[dict[str, str]] = {
    "checkout": "60/minute",
    "billing": "120/minute",
    "credentials": "20/minute",
    "streams": "120/minute",
    "read": "1200/minute",
    # Requests without an API key, per address.
    "anonymous": "60/minute",
    # Requests with a key that is not one, per address (a guesser): counted apart, since an
    # address over it is refused before its key is looked up, valid keys too, where a client
    # that merely forgot its key must not lock out the others behind the same address.
    "bad_keys": "60/minute",
    # Webhook deliveries that fail verification, per address. Stripe's own never fail (unless
    # STRIPE_WEBHOOK_SECRET is wrong, and then Stripe retries for days): only a flood is cut.
    "unverified_webhooks": "30/minute",
}
# What a refusal calls the requests of a category.
_NOUNS: Final[dict[str, str]] = {
    "anonymous": "requests without an API key",
    "bad_keys": "requests with an invalid API key",
    "unverified_webhooks": "webhook deliveries without a valid signature",
}
# Identities remembered as full at most: past it (a flood from as many addresses), the
# limiter asks Redis as before.
_MAX_REMEMBERED = 10_000


def category_for(method: str, path: str) -> str:
    if path.startswith("/v1/checkout"):
        return "checkout"
    if path.startswith("/v1/subscriptions/") and method == "POST":
        return "billing"
    if path == "/v1/billing/portal":  # each one is a call to Stripe
        return "billing"
    if path.endswith("/credentials") or (path.startswith("/v1/api-keys") and method != "GET"):
        return "credentials"
    if path.endswith("/events") or path == "/v1/stream-tokens":
        return "streams"
    return "read"


@dataclass(frozen=True, slots=True)
class Allowance:
    limit: int
    remaining: int
    reset_at: float

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(math.ceil(self.reset_at)),
        }


class _SharedClusterStorage(RedisClusterStorage):
    """`limits`' Redis Cluster storage on the app's own cluster client: `limits` would make a
    client of its own from a URL, which nothing would close. Its redis-py bridge reads the
    client through `storage` and `connection_getter` (as its basic mode does with a pool)."""

    def __init__(self, cluster: RedisCluster, *, key_prefix: str) -> None:
        self._cluster = cluster
        super().__init__(
            "async+redis+cluster://127.0.0.1:6379", implementation="redispy", key_prefix=key_prefix
        )

    def configure_bridge(self) -> None:
        bridge = self.bridge
        assert isinstance(bridge, RedispyBridge), "implementation='redispy'"
        # The very class limits makes in cluster mode, which its client Protocol misses.
        client: Any = self._cluster
        bridge.storage = client
        bridge.connection_getter = lambda _readonly: client


class RateLimits:
    def __init__(
        self, redis: RedisClient, *, prefix: str, limits: Mapping[str, str] = LIMITS
    ) -> None:
        # The app's own connection pool (or cluster client): closed by the lifespan. Every
        # window is one key, so a cluster takes each to its node.
        key_prefix = prefix + "ratelimit"
        if isinstance(redis, RedisCluster):
            self._storage: RedisStorage = _SharedClusterStorage(redis, key_prefix=key_prefix)
        else:
            self._storage = RedisStorage(
                "async+redis://",
                implementation="redispy",
                key_prefix=key_prefix,
                connection_pool=redis.connection_pool,  # type: ignore[arg-type]
            )
        self._limiter = MovingWindowRateLimiter(self._storage)
        self._items: dict[str, RateLimitItem] = {name: parse(rule) for name, rule in limits.items()}
        # (category, identity) -> when its window frees a slot (epoch seconds).
        self._full_until: dict[tuple[str, str], float] = {}

    async def check(self, category: str, identity: str) -> Allowance | None:
        """Counts one request; raises a 429 `APIError` once over the limit. Answers None when
        the limiter could not be asked."""
        self.refuse_if_full(category, identity)
        item = self._items[category]
        try:
            allowed = await self._limiter.hit(item, category, identity)
            stats = await self._limiter.get_window_stats(item, category, identity)
        except (RedisError, OSError, ConnectionError) as exc:
            logger.warning("rate limiter unavailable (%s); letting the request through", exc)
            return None
        allowance = Allowance(item.amount, max(stats.remaining, 0), stats.reset_time)
        if not allowed or stats.remaining <= 0:
            self._remember_full(category, identity, stats.reset_time)
        if not allowed:
            raise self._refusal(category, stats.reset_time)
        return allowance

    def refuse_if_full(self, category: str, identity: str) -> None:
        """Raises the 429 when this process knows the identity's window to be full: no Redis,
        no other work."""
        key = (category, identity)
        reset_at = self._full_until.get(key)
        if reset_at is None:
            return
        if reset_at <= time.time():
            del self._full_until[key]
            return
        raise self._refusal(category, reset_at)

    def _remember_full(self, category: str, identity: str, reset_at: float) -> None:
        if len(self._full_until) >= _MAX_REMEMBERED:
            now = time.time()
            self._full_until = {k: t for k, t in self._full_until.items() if t > now}
            if len(self._full_until) >= _MAX_REMEMBERED:
                return
        self._full_until[(category, identity)] = reset_at

    def _refusal(self, category: str, reset_at: float) -> APIError:
        item = self._items[category]
        retry_after = max(1, math.ceil(reset_at - time.time()))
        noun = _NOUNS.get(category, f"{category} requests")
        return APIError(
            429,
            "rate_limited",
            f"Too many {noun}; try again in {retry_after} s.",
            headers={
                **Allowance(item.amount, 0, reset_at).headers(),
                "Retry-After": str(retry_after),
            },
        )


class RateLimitMiddleware:
    """Adds the X-RateLimit-* headers of the allowance a route's authentication counted."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                allowance = scope.get("state", {}).get("rate_limit")
                if isinstance(allowance, Allowance):
                    headers = MutableHeaders(scope=message)
                    for name, value in allowance.headers().items():
                        headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)
