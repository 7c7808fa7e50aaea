"""The plan-limit step that every provision starts with."""

from __future__ import annotations

import asyncpg

from .backend import Step, StepContext
from .errors import PlanLimitExceeded
from .resources import count_held_before

__all__ = ["check_limits_step"]


def check_limits_step(pool: asyncpg.Pool) -> Step:
    """``max_resources``: how many live resources of this plan one user may hold (the rule
    is the billing layer's, handed down as this number; checkout enforced it already, this
    catches what got past it, such as a Checkout Session paid after a later one)."""

    async def check(ctx: StepContext) -> None:
        limit = ctx.spec.limits.get("max_resources")
        if limit is None:
            return
        async with pool.acquire() as conn:
            held = await count_held_before(conn, ctx.resource_id)
        if held >= limit:
            raise PlanLimitExceeded(
                f"Your {ctx.spec.plan_name} plan allows {limit} {ctx.spec.resource_type}(s) of"
                f" that plan at a time and you already have {held}; remove one before adding"
                " another."
            )

    return Step("check_limits", "Checking your plan's limits", check)
