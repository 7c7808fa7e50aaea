"""What Stripe's freedom to deliver late and out of order must not change: each test sends a
flow's events in orders the emulator's in-order delivery never produced."""

from __future__ import annotations

from typing import Any

import pytest

from app.settings import Settings
from tests.app.billing.test_lifecycle import wait_processed
from tests.support.stack import Stack, running_stack
from tests.support.stripe_events import deliver

pytestmark = pytest.mark.anyio


async def _bounced_bank_debit(stack: Stack, name: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """A checkout paid by a bank debit that bounces, its events held: answers the Lookout
    subscription and the events by type."""
    started = await stack.checkout("graph-standard", name)
    session = started["checkout_session_id"]
    events: dict[str, dict[str, Any]] = {}
    for path, body in (
        ("pay", {"async_payment": True}),
        ("async_payment", {"succeeded": False}),
    ):
        answer = await stack.emulator.post(
            f"/_emulator/checkout/{session}/{path}", json={**body, "deliver_webhooks": False}
        )
        assert answer.status_code == 200, answer.text
        for made in answer.json()["events"]:
            events[made["type"]] = await stack.stripe_event(made["id"])
    return started["subscription_id"], events


async def test_a_bounced_first_payment_fails_in_any_order(settings: Settings) -> None:
    """`incomplete_expired` used to mean `expired` (an abandoned checkout) when it came before
    `checkout.session.async_payment_failed`, and `failed` after it."""
    orders = [
        ("customer.subscription.updated", "checkout.session.async_payment_failed"),
        ("checkout.session.async_payment_failed", "customer.subscription.updated"),
        ("invoice.payment_failed", "checkout.session.completed"),
    ]
    async with running_stack(settings, shuffle_webhooks=False) as stack:
        for number, order in enumerate(orders):
            subscription_id, events = await _bounced_bank_debit(stack, f"bounced-{number}")
            assert events["customer.subscription.updated"]["data"]["object"]["status"] == (
                "incomplete_expired"
            )
            for event_type in order:
                answer = await deliver(
                    stack.anonymous, events[event_type], stack.settings.stripe_webhook_secrets[0]
                )
                assert answer.status_code == 200
            await stack.wait_for_status(subscription_id, "failed")
            await wait_processed(stack)
            assert (await stack.subscription(subscription_id))["status"] == "failed", order


async def test_an_invoice_paid_that_comes_first_alone_starts_provisioning(
    settings: Settings,
) -> None:
    """Its subscription's metadata, which Stripe copies into the invoice, names ours: it no
    longer waits for an event that names the Stripe subscription."""
    async with running_stack(settings, shuffle_webhooks=False) as stack:
        started = await stack.checkout("graph-standard", "invoice-first")
        events = await stack.paid_events(started["checkout_session_id"])
        answer = await deliver(
            stack.anonymous, events["invoice.paid"], stack.settings.stripe_webhook_secrets[0]
        )
        assert answer.status_code == 200
        active = await stack.wait_for_status(started["subscription_id"], "active")
        assert active["operation_id"] is not None
