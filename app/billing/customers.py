"""The `stripe_customers` table: one Stripe Customer per user, made on the user's first
purchase and named by every later one (and by the Customer Portal)."""

from __future__ import annotations

import asyncpg

from app.billing.provider import PaymentProvider
from app.users import User

__all__ = ["customer_key", "ensure_stripe_customer", "stripe_customer_id"]


def customer_key(user_id: str) -> str:
    return f"lookout-customer-{user_id}"


async def stripe_customer_id(pool: asyncpg.Pool, user_id: str) -> str | None:
    async with pool.acquire() as conn:
        found: str | None = await conn.fetchval(
            "SELECT customer_id FROM stripe_customers WHERE user_id = $1", user_id
        )
    return found


async def ensure_stripe_customer(pool: asyncpg.Pool, provider: PaymentProvider, user: User) -> str:
    """The user's Stripe Customer, created on first use. Two purchases at once create one:
    both ask Stripe under the same idempotency key (Stripe answers the second with the first's
    Customer) and the first row written is the one kept. Raises `PaymentProviderError`."""
    known = await stripe_customer_id(pool, user.id)
    if known is not None:
        return known
    created = await provider.create_customer(
        email=user.email, lookout_user_id=user.id, idempotency_key=customer_key(user.id)
    )
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO stripe_customers (user_id, customer_id) VALUES ($1, $2)"
            " ON CONFLICT (user_id) DO NOTHING",
            user.id,
            created,
        )
        # A statement of its own: it sees the row of a concurrent writer that won.
        kept: str = await conn.fetchval(
            "SELECT customer_id FROM stripe_customers WHERE user_id = $1", user.id
        )
    return kept
