"""Rate limits: per user and category, per IP when anonymous; honest headers; never on Stripe."""

from __future__ import annotations

import time

import pytest

from app.settings import Settings
from app.web.ratelimit import LIMITS
from tests.support.stack import running_stack
from tests.support.stripe_events import deliver, make_event, stripe_object

pytestmark = pytest.mark.anyio


async def test_a_user_over_a_category_limit_gets_429_with_the_real_reset(
    settings: Settings,
) -> None:
    limit = int(LIMITS["credentials"].split("/")[0])
    async with running_stack(settings) as stack:
        first = await stack.http.post("/v1/graphs/gr_missing/credentials")
        assert first.status_code == 404
        assert first.headers["X-RateLimit-Limit"] == str(limit)
        assert first.headers["X-RateLimit-Remaining"] == str(limit - 1)
        for _ in range(limit - 1):
            await stack.http.post("/v1/graphs/gr_missing/credentials")
        refused = await stack.http.post("/v1/graphs/gr_missing/credentials")
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limited"
        retry_after = int(refused.headers["Retry-After"])
        reset = int(refused.headers["X-RateLimit-Reset"])
        assert 1 <= retry_after <= 60
        assert abs(reset - (time.time() + retry_after)) <= 2
        # Another category of the same user is not affected.
        assert (await stack.http.get("/v1/subscriptions")).status_code == 200


async def test_anonymous_requests_are_limited_per_ip_but_webhooks_are_not(
    settings: Settings,
) -> None:
    limit = int(LIMITS["anonymous"].split("/")[0])
    async with running_stack(settings) as stack:
        answers = [
            (await stack.anonymous.get("/v1/subscriptions")).status_code for _ in range(limit + 1)
        ]
        assert answers[:limit] == [401] * limit
        assert answers[limit] == 429
        # A valid key from the same address is not locked out by clients without one.
        assert (await stack.http.get("/v1/subscriptions")).status_code == 200
        secret = stack.settings.stripe_webhook_secrets[0]
        for _ in range(5):
            event = make_event("invoice.created", stripe_object("invoice"))
            assert (await deliver(stack.anonymous, event, secret)).status_code == 200
