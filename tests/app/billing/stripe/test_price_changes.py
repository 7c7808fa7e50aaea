"""Plan changes in Stripe (issue 13): `StripePaymentProvider.change_price` through the real
SDK against the emulator, which prorates as Stripe documents and refuses what Stripe refuses."""

from __future__ import annotations

import httpx
import pytest

from app.billing.plans import get_plan, plan_by_lookup_key, price_lookup_key
from app.billing.provider import PaymentProviderError
from app.billing.stripe.provider import StripePaymentProvider
from tests.app.billing.stripe.test_provider import (  # the fixtures, for this module too
    API_KEY,
    Stripe,
    _paid,
    emulator,  # noqa: F401
    provider,  # noqa: F401
)

pytestmark = pytest.mark.anyio

LARGE = get_plan("graph-large")
STANDARD = get_plan("graph-standard")


async def items_update(stripe: Stripe, sub_id: str, form: dict[str, str]) -> httpx.Response:
    return await stripe.http.post(
        f"{stripe.base}/v1/subscriptions/{sub_id}",
        data=form,
        headers={"Authorization": f"Bearer {API_KEY}"},
    )


async def test_an_upgrade_is_invoiced_at_once_and_a_downgrade_credited(
    provider: StripePaymentProvider,  # noqa: F811 (the imported fixtures)
    emulator: Stripe,  # noqa: F811
) -> None:
    sub_id = await _paid(provider, emulator, "sub_local_upgrade")
    upgraded = await provider.change_price(
        sub_id, LARGE, upgrade=True, idempotency_key="lookout-test-up"
    )
    assert plan_by_lookup_key(upgraded.price_lookup_key) == LARGE
    assert upgraded.price_lookup_key == price_lookup_key(LARGE, "test")
    invoice = await emulator.get(f"/v1/invoices/{upgraded.latest_invoice_id}")
    assert invoice["billing_reason"] == "subscription_update"
    assert invoice["status"] == "paid"
    # Almost the whole period is left: nearly the whole difference, never more.
    difference = LARGE.price.amount - STANDARD.price.amount
    assert difference * 0.9 <= invoice["amount_paid"] <= difference
    assert invoice["lines"]["data"][0]["parent"]["subscription_item_details"]["proration"]
    # Asked again with the same key: the same answer, no second invoice.
    again = await provider.change_price(
        sub_id, LARGE, upgrade=True, idempotency_key="lookout-test-up"
    )
    assert again.latest_invoice_id == upgraded.latest_invoice_id
    updates = await emulator.requests("POST", f"/v1/subscriptions/{sub_id}")
    assert [r["params"]["proration_behavior"] for r in updates] == ["always_invoice"] * 2
    assert updates[1]["idempotent_replayed"] is True

    downgraded = await provider.change_price(
        sub_id, STANDARD, upgrade=False, idempotency_key="lookout-test-down"
    )
    assert plan_by_lookup_key(downgraded.price_lookup_key) == STANDARD
    assert downgraded.latest_invoice_id == upgraded.latest_invoice_id  # no invoice now
    customer = await emulator.get(f"/v1/customers/{downgraded.customer_id}")
    assert -difference <= customer["balance"] < 0  # credited to the next invoice


async def test_the_emulator_refuses_item_changes_stripe_refuses(
    provider: StripePaymentProvider,  # noqa: F811 (the imported fixtures)
    emulator: Stripe,  # noqa: F811
) -> None:
    sub_id = await _paid(provider, emulator, "sub_local_refused")
    price = await provider.ensure_price(LARGE)
    sub = await emulator.get(f"/v1/subscriptions/{sub_id}")
    item = sub["items"]["data"][0]["id"]
    for form, param in (
        ({"items[0][id]": "si_unknown", "items[0][price]": price}, "items[0][id]"),
        ({"items[0][id]": item, "items[0][price]": "price_unknown"}, "items[0][price]"),
        (
            {"items[0][id]": item, "items[0][price]": price, "proration_behavior": "sometimes"},
            "proration_behavior",
        ),
        ({"proration_behavior": "none"}, "proration_behavior"),
    ):
        answer = await items_update(emulator, sub_id, form)
        assert answer.status_code in (400, 404), answer.text
        assert answer.json()["error"]["param"] == param
    assert (await emulator.get(f"/v1/subscriptions/{sub_id}"))["items"]["data"][0]["price"][
        "unit_amount"
    ] == STANDARD.price.amount

    # Ended as Stripe ends one (its status control refuses a jump to canceled).
    await provider.cancel_subscription_now(sub_id, idempotency_key="end")
    with pytest.raises(PaymentProviderError):
        await provider.change_price(sub_id, LARGE, upgrade=True, idempotency_key="late")


def test_plans_are_found_by_their_prices_lookup_keys() -> None:
    assert plan_by_lookup_key(price_lookup_key(LARGE, "staging")) == LARGE
    assert plan_by_lookup_key("someone_elses_price") is None
    assert plan_by_lookup_key(None) is None
