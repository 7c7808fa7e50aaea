"""A Lookout instance that performs a failed provisioning's compensations and dies right after
Stripe refunded, before recording it: it prints ``REFUNDED <refund id>`` and waits there for
the test's SIGKILL. It holds its instance lock meanwhile, as a running instance does.

    python child_compensation.py DATABASE_URL REDIS_URL STRIPE_API_BASE STRIPE_API_KEY SUB_ID
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import anyio
import asyncpg
from redis.asyncio import Redis

from app.billing.compensation import BillingHooks
from app.billing.provider import RefundInfo
from app.billing.stripe.provider import StripePaymentProvider
from provisioning import TERMINAL_EVENT_TYPES
from provisioning.leases import InstanceLock
from streams import EventPublisher

CHILD_INSTANCE = "child-compensation"


class DiesAfterRefund(StripePaymentProvider):
    async def refund_first_payment(
        self,
        subscription_id: str,
        *,
        idempotency_key: str,
        metadata: Mapping[str, str] | None = None,
    ) -> RefundInfo | None:
        refund = await super().refund_first_payment(
            subscription_id, idempotency_key=idempotency_key, metadata=metadata
        )
        print(f"REFUNDED {refund.id if refund else None}", flush=True)
        await anyio.sleep_forever()
        return refund


async def main(argv: list[str]) -> None:
    database_url, redis_url, api_base, api_key, subscription_id = argv
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    publisher = EventPublisher(Redis.from_url(redis_url), terminal_types=TERMINAL_EVENT_TYPES)
    provider = DiesAfterRefund(api_key, environment="test", api_base=api_base)
    async with anyio.create_task_group() as tg:
        await tg.start(InstanceLock(pool, CHILD_INSTANCE).run)
        hooks = BillingHooks(pool, provider, publisher, instance_id=CHILD_INSTANCE)
        await hooks.cancel_due(subscription_id=subscription_id)
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1:])
