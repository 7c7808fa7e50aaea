"""Rate limits per user (per IP when anonymous) and per category, shared by all instances
through Redis (the `limits` library: its moving window answers the real time to reset).

Billing and checkout are generous ("never block a paying customer") but still bounded; if
Redis cannot be asked, the request goes through rather than failing a customer.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from limits import RateLimitItem, parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import APIError

__all__ = ["LIMITS", "RateLimitMiddleware", "RateLimits", "category_for"]

logger = logging.getLogger(__name__)

LIMITS: Final[dict[str, str]] = {
    "checkout": "60/minute",
    "billing": "120/minute",
    "credentials": "20/minute",
    "streams": "120/minute",
    "read": "1200/minute",
    "anonymous": "60/minute",
}


def category_for(method: str, path: str) -> str:
    if path.startswith("/v1/checkout"):
        return "checkout"
    if path.startswith("/v1/subscriptions/") and method == "POST":
        return "billing"
    if path.endswith("/credentials"):
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


class RateLimits:
    def __init__(self, redis: Redis, *, prefix: str, limits: Mapping[str, str] = LIMITS) -> None:
        # The app's own connection pool: one pool per process, closed by the lifespan.
        self._storage = RedisStorage(
            "async+redis://",
            implementation="redispy",
            key_prefix=prefix + "ratelimit",
            connection_pool=redis.connection_pool,  # type: ignore[arg-type]
        )
        self._limiter = MovingWindowRateLimiter(self._storage)
        self._items: dict[str, RateLimitItem] = {name: parse(rule) for name, rule in limits.items()}

    async def check(self, category: str, identity: str) -> Allowance | None:
        """Counts one request; raises a 429 `APIError` once over the limit. Answers None when
        the limiter could not be asked."""
        item = self._items[category]
        try:
            allowed = await self._limiter.hit(item, category, identity)
            stats = await self._limiter.get_window_stats(item, category, identity)
        except (RedisError, OSError, ConnectionError) as exc:
            logger.warning("rate limiter unavailable (%s); letting the request through", exc)
            return None
        allowance = Allowance(item.amount, max(stats.remaining, 0), stats.reset_time)
        if not allowed:
            retry_after = max(1, math.ceil(stats.reset_time - time.time()))
            raise APIError(
                429,
                "rate_limited",
                f"Too many {category} requests; try again in {retry_after} s.",
                headers={**allowance.headers(), "Retry-After": str(retry_after)},
            )
        return allowance


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
