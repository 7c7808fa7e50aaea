"""Plan limits: one rule, decided at checkout under a lock, the same at provisioning."""

from __future__ import annotations

import anyio
import httpx
import pytest

from app.settings import Settings
from tests.support.stack import Stack, running_stack

pytestmark = pytest.mark.anyio


async def buy(stack: Stack, plan: str, name: str) -> str:
    started = await stack.checkout(plan, name)
    await stack.pay(started["checkout_session_id"])
    return str(started["subscription_id"])


async def checkout(stack: Stack, key: str, name: str, answers: list[httpx.Response]) -> None:
    """An XLarge checkout as the customer with `key`, its answer appended to `answers`."""
    answers.append(
        await stack.anonymous.post(
            "/v1/checkout",
            json={"plan": "graph-xlarge", "resource_name": name},
            headers={"Authorization": f"Bearer {key}"},
        )
    )


async def test_three_standard_graphs_then_an_xlarge_is_refused_or_served_never_failed(
    settings: Settings,
) -> None:
    """On f68d3ea checkout counted per plan and provisioning per resource type: the XLarge
    was sold, paid, then failed (and was cancelled). The rule is per plan, in both places."""
    async with running_stack(settings) as stack:
        for number in range(3):
            await stack.wait_for_status(
                await buy(stack, "graph-standard", f"std-{number}"), "active"
            )
        fourth = await stack.http.post(
            "/v1/checkout", json={"plan": "graph-standard", "resource_name": "std-3"}
        )
        assert fourth.status_code == 409
        assert fourth.json()["error"]["code"] == "plan_limit_reached"
        assert "Graph Standard plan allows 3" in fourth.json()["error"]["message"]

        xlarge = await buy(stack, "graph-xlarge", "big-one")
        served = await stack.wait_for_status(xlarge, "active")
        assert served["plan"] == "graph-xlarge"

        second = await stack.http.post(
            "/v1/checkout", json={"plan": "graph-xlarge", "resource_name": "big-two"}
        )
        assert second.status_code == 409
        assert second.json()["error"] == {
            "code": "plan_limit_reached",
            "message": "The Graph XLarge plan allows 1 per customer and you already have 1;"
            " cancel one first or choose another plan.",
        }


async def test_concurrent_checkouts_over_a_limit_of_one_let_exactly_one_through(
    settings: Settings,
) -> None:
    async with running_stack(settings) as stack:
        for attempt in range(4):
            _, key = await stack.new_user(f"race-{attempt}@example.com")
            answers: list[httpx.Response] = []
            async with anyio.create_task_group() as tg:
                for name in ("first", "second", "third"):
                    tg.start_soon(checkout, stack, key, name, answers)

            assert sorted(a.status_code for a in answers) == [201, 409, 409], [
                a.text for a in answers
            ]
            refused = [a.json()["error"]["code"] for a in answers if a.status_code == 409]
            assert refused == ["plan_limit_reached", "plan_limit_reached"]


async def test_an_open_checkout_counts_and_starting_it_again_replaces_it(
    settings: Settings,
) -> None:
    async with running_stack(settings) as stack:
        first = await stack.checkout("graph-xlarge", "prod")
        other = await stack.http.post(
            "/v1/checkout", json={"plan": "graph-xlarge", "resource_name": "prod-2"}
        )
        assert other.status_code == 409
        assert other.json()["error"]["code"] == "plan_limit_reached"
        # The same name again: the open checkout is expired in Stripe and replaced.
        again = await stack.checkout("graph-xlarge", "prod")
        assert again["subscription_id"] != first["subscription_id"]
        assert (await stack.subscription(first["subscription_id"]))["status"] == "expired"
        await stack.pay(again["checkout_session_id"])
        await stack.wait_for_status(again["subscription_id"], "active")
