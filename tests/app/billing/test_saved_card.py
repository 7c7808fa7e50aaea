"""Subscribing with a saved payment method: `POST /v1/subscriptions`, no Checkout round trip."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from app.settings import Settings
from tests.support.stack import Stack, running_stack

pytestmark = pytest.mark.anyio


async def _customer_of(stack: Stack, subscription_id: str) -> str:
    async with stack.app.state.services.pool.acquire() as conn:
        found: str = await conn.fetchval(
            "SELECT stripe_customer_id FROM subscriptions WHERE id = $1", subscription_id
        )
    return found


async def _save_card(stack: Stack, customer_id: str, card: str = "succeeds") -> None:
    answer = await stack.emulator.post(
        f"/_emulator/customers/{customer_id}/payment_method", json={"card": card}
    )
    assert answer.status_code == 200, answer.text


async def _bought_once(stack: Stack) -> str:
    """A first purchase through Checkout: answers the Stripe Customer it made."""
    first = await stack.checkout("graph-standard", "first-graph")
    await stack.pay(first["checkout_session_id"])
    await stack.wait_for_status(first["subscription_id"], "active")
    return await _customer_of(stack, first["subscription_id"])


async def _subscribe(stack: Stack, name: str, plan: str = "graph-standard") -> Any:
    return await stack.http.post("/v1/subscriptions", json={"plan": plan, "resource_name": name})


async def test_a_saved_card_subscribes_without_checkout(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        customer = await _bought_once(stack)
        await _save_card(stack, customer)
        answer = await _subscribe(stack, "second-graph")
        assert answer.status_code == 201, answer.text
        created = answer.json()
        assert created["status"] in ("pending_payment", "provisioning", "active")
        assert created["plan"] == "graph-standard" and "checkout_url" not in created
        active = await stack.wait_for_status(created["id"], "active")
        assert active["operation_id"] is not None and active["resource_id"]
        # Stripe's subscription belongs to the same Customer, charged at once, no session.
        auth = {"Authorization": f"Bearer {stack.settings.stripe_api_key}"}
        subs = (
            await stack.emulator.get(f"/v1/subscriptions?customer={customer}", headers=auth)
        ).json()["data"]
        ours = next(s for s in subs if s["metadata"]["lookout_subscription_id"] == created["id"])
        assert ours["status"] == "active"
        requests = (
            await stack.emulator.get(
                "/_emulator/requests", params={"method": "POST", "path": "/v1/subscriptions"}
            )
        ).json()["data"]
        assert requests[0]["params"]["payment_behavior"] == "error_if_incomplete"
        assert requests[0]["idempotency_key"] == f"lookout-subscribe-{created['id']}"


async def test_without_a_saved_card_the_answer_is_402(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        never_bought = await _subscribe(stack, "no-card")
        assert never_bought.status_code == 402
        assert never_bought.json()["error"]["code"] == "payment_method_required"
        await _bought_once(stack)  # Checkout's card is the subscription's, not a saved default
        no_default = await _subscribe(stack, "no-card")
        assert no_default.status_code == 402
        assert no_default.json()["error"]["code"] == "payment_method_required"
        listed = (await stack.http.get("/v1/subscriptions")).json()["data"]
        assert [s["resource_name"] for s in listed if s["status"] != "active"] == []


async def test_a_declined_saved_card_creates_nothing(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        customer = await _bought_once(stack)
        await _save_card(stack, customer, "declined")
        answer = await _subscribe(stack, "declined")
        assert answer.status_code == 402
        assert answer.json()["error"]["code"] == "card_declined"
        listed = (await stack.http.get("/v1/subscriptions")).json()["data"]
        assert len(listed) == 1


async def test_a_card_that_needs_authentication_falls_back_to_checkout(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        customer = await _bought_once(stack)
        await _save_card(stack, customer, "requires_action")
        answer = await _subscribe(stack, "with-3ds")
        assert answer.status_code == 201, answer.text
        created = answer.json()
        assert created["status"] == "pending_payment"
        assert created["checkout_url"].startswith(stack.emulator_url)
        session_id = created["checkout_url"].rsplit("/", 1)[1]
        await stack.pay(session_id)
        await stack.wait_for_status(created["id"], "active")


async def test_a_double_submit_makes_one_subscription(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        customer = await _bought_once(stack)
        await _save_card(stack, customer)
        # Stripe is slow to answer the first: the second arrives while it is under way.
        slow = {"method": "POST", "path": "/v1/subscriptions", "status": 200, "delay": 1.0}
        await stack.emulator.post("/_emulator/faults", json=slow)
        answers: list[Any] = []

        async def submit() -> None:
            answers.append(await _subscribe(stack, "twice"))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(submit)
            tasks.start_soon(submit)
        codes = sorted(a.status_code for a in answers)
        assert codes[0] == 201 and codes[1] in (201, 409, 503), [a.text for a in answers]
        if codes[1] != 201:  # the customer tries again: it finishes the same subscription
            again = await _subscribe(stack, "twice")
            assert again.status_code == 201, again.text
            answers.append(again)
        ids = {a.json()["id"] for a in answers if a.status_code == 201}
        assert len(ids) == 1
        await stack.wait_for_status(ids.pop(), "active")
        auth = {"Authorization": f"Bearer {stack.settings.stripe_api_key}"}
        subs = (
            await stack.emulator.get(f"/v1/subscriptions?customer={customer}", headers=auth)
        ).json()["data"]
        assert len(subs) == 2  # the first purchase's and this one
        listed = (await stack.http.get("/v1/subscriptions")).json()["data"]
        assert [s["resource_name"] for s in listed].count("twice") == 1
