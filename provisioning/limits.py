"""The plan-limit step that every provision starts with."""

from __future__ import annotations

import asyncpg

from .backend import Step, StepContext
from .errors import PlanLimitExceeded
from .resources import count_held_before

__all__ = ["check_limits_step"]


def check_limits_step(pool: asyncpg.Pool) -> Step:
    """``max_resources``: how many live resources of this type the plan lets one user hold."""

    async def check(ctx: StepContext) -> None:
        limit = ctx.spec.limits.get("max_resources")
        if limit is None:
            return
        async with pool.acquire() as conn:
            held = await count_held_before(conn, ctx.resource_id)
        if held >= limit:
            noun = "graph" if ctx.spec.resource_type == "graph" else ctx.spec.resource_type
            raise PlanLimitExceeded(
                f"Your {ctx.spec.plan_name} plan allows {limit} {noun}(s) at a time and you"
                f" already have {held}; remove one before adding another."
            )

    return Step("check_limits", "Checking your plan's limits", check)
