"""`StripePaymentProvider` through the real SDK against the emulator on a loopback port, and the
plan catalog it sells."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from stripe._api_version import _ApiVersion

from app.billing.plans import PLANS, UnknownPlan, get_plan, price_lookup_key, stripe_product_name
from app.billing.provider import (
    PaymentProvider,
    PaymentProviderError,
    PaymentProviderNotFound,
    PaymentProviderUnavailable,
    SubscriptionAlreadyCanceled,
)
from app.billing.stripe.provider import STRIPE_API_VERSION, StripePaymentProvider
from app.demo.stripe_emulator import API_VERSION, create_emulator
from tests.support import free_port, live_server

pytestmark = pytest.mark.anyio

API_KEY = "sk_test_provider"
STANDARD = get_plan("graph-standard")


@dataclass
class Stripe:
    base: str
    http: httpx.AsyncClient

    async def control(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = await self.http.post(f"{self.base}/_emulator/{path}", json=body or {})
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    async def requests(self, method: str, path: str | None = None) -> list[dict[str, Any]]:
        query = {"method": method, **({"path": path} if path else {})}
        response = await self.http.get(f"{self.base}/_emulator/requests", params=query)
        rows: list[dict[str, Any]] = response.json()["data"]
        return rows

    async def get(self, path: str) -> dict[str, Any]:
        response = await self.http.get(
            f"{self.base}{path}", headers={"Authorization": f"Bearer {API_KEY}"}
        )
        result: dict[str, Any] = response.json()
        return result


@pytest.fixture
async def emulator() -> AsyncIterator[Stripe]:
    port = free_port()
    app = create_emulator(
        webhook_url=None,
        webhook_secret="whsec_unused",
        public_url=f"http://127.0.0.1:{port}",
        api_key=API_KEY,
    )
    async with live_server(app, port=port) as base, httpx.AsyncClient() as http:
        yield Stripe(base, http)


@pytest.fixture
async def provider(emulator: Stripe) -> AsyncIterator[StripePaymentProvider]:
    p = StripePaymentProvider(API_KEY, environment="test", api_base=emulator.base)
    yield p
    await p.aclose()


async def _checkout(provider: StripePaymentProvider, local_id: str) -> str:
    session = await provider.create_checkout_session(
        plan=STANDARD,
        lookout_subscription_id=local_id,
        success_url="https://lookout.test/v1/checkout/{CHECKOUT_SESSION_ID}",
        cancel_url="https://lookout.test/cancelled",
        customer_email="ada@example.com",
    )
    return session.id


async def _paid(provider: StripePaymentProvider, emulator: Stripe, local_id: str) -> str:
    session_id = await _checkout(provider, local_id)
    paid = await emulator.control(f"checkout/{session_id}/pay", {"deliver_webhooks": False})
    sub_id: str = paid["object"]["subscription"]
    return sub_id


def test_catalog() -> None:
    assert {"graph-standard", "graph-large", "graph-xlarge"} <= set(PLANS)
    assert {p.resource_type for p in PLANS.values()} == {"graph", "repository"}
    assert STANDARD.display_name == "Graph Standard"
    assert STANDARD.as_json()["price"] == {"amount": 2900, "currency": "usd", "interval": "month"}
    assert STANDARD.limits.max_connections >= 1 and STANDARD.limits.max_per_user >= 1
    large = get_plan("graph-large")
    assert large.price.amount > STANDARD.price.amount
    assert large.limits.max_connections > STANDARD.limits.max_connections
    with pytest.raises(UnknownPlan, match="graph-standard"):
        get_plan("graph-huge")


def test_names_and_lookup_keys_per_environment() -> None:
    assert stripe_product_name(STANDARD, "production") == "Graph Standard"
    assert stripe_product_name(STANDARD, "staging") == "Graph Standard (staging)"
    assert price_lookup_key(STANDARD, "staging") != price_lookup_key(STANDARD, "production")
    assert price_lookup_key(STANDARD, "Staging") == price_lookup_key(STANDARD, "staging")


def test_pinned_api_version_matches_the_sdk_and_the_emulator() -> None:
    assert STRIPE_API_VERSION == _ApiVersion.CURRENT == API_VERSION


def test_stripe_provider_is_a_payment_provider() -> None:
    provider: PaymentProvider = StripePaymentProvider("sk_test_x", environment="test")
    assert isinstance(provider, StripePaymentProvider)


async def test_ensure_price_from_five_processes_creates_one(emulator: Stripe) -> None:
    # Five providers share no lock: only Stripe's idempotency can keep this to one price.
    providers = [
        StripePaymentProvider(API_KEY, environment="test", api_base=emulator.base) for _ in range(5)
    ]
    try:
        ids = await asyncio.gather(*(p.ensure_price(STANDARD) for p in providers))
    finally:
        await asyncio.gather(*(p.aclose() for p in providers))
    assert len(set(ids)) == 1
    key = price_lookup_key(STANDARD, "test")
    listed = await emulator.get(f"/v1/prices?lookup_keys[]={key}")
    assert [p["id"] for p in listed["data"]] == ids[:1]
    assert len((await emulator.get("/v1/prices?limit=100"))["data"]) == 1
    products = (await emulator.get("/v1/products"))["data"]
    assert [p["name"] for p in products] == ["Graph Standard (test)"]
    creates = await emulator.requests("POST", "/v1/prices")
    assert creates, "no price was created"
    assert {r["idempotency_key"] for r in creates} == {f"lookout-price-{key}-2900-usd-month"}
    assert sum(not r["idempotent_replayed"] for r in creates) == 1


async def test_ensure_price_finds_the_existing_price(
    emulator: Stripe, provider: StripePaymentProvider
) -> None:
    first = await provider.ensure_price(STANDARD)
    again = StripePaymentProvider(API_KEY, environment="test", api_base=emulator.base)
    try:
        assert await again.ensure_price(STANDARD) == first
    finally:
        await again.aclose()
    assert await provider.ensure_price(STANDARD) == first
    assert len(await emulator.requests("POST", "/v1/prices")) == 1


async def test_a_new_amount_takes_over_the_lookup_key(
    emulator: Stripe, provider: StripePaymentProvider
) -> None:
    old = await provider.ensure_price(STANDARD)
    dearer = dataclasses.replace(STANDARD, price=dataclasses.replace(STANDARD.price, amount=3900))
    fresh = StripePaymentProvider(API_KEY, environment="test", api_base=emulator.base)
    try:
        new = await fresh.ensure_price(dearer)
    finally:
        await fresh.aclose()
    assert new != old
    old_price, new_price = (
        await emulator.get(f"/v1/prices/{old}"),
        await emulator.get(f"/v1/prices/{new}"),
    )
    assert old_price["lookup_key"] is None
    assert new_price["lookup_key"] == price_lookup_key(STANDARD, "test")
    assert new_price["unit_amount"] == 3900 and new_price["product"] == old_price["product"]


async def test_production_product_has_the_plain_name(emulator: Stripe) -> None:
    prod = StripePaymentProvider(API_KEY, environment="production", api_base=emulator.base)
    try:
        price_id = await prod.ensure_price(STANDARD)
    finally:
        await prod.aclose()
    price = await emulator.get(f"/v1/prices/{price_id}")
    assert (await emulator.get(f"/v1/products/{price['product']}"))["name"] == "Graph Standard"


async def test_checkout_session_carries_our_ids(
    emulator: Stripe, provider: StripePaymentProvider
) -> None:
    session = await provider.create_checkout_session(
        plan=STANDARD,
        lookout_subscription_id="sub_abc",
        success_url="https://lookout.test/return/{CHECKOUT_SESSION_ID}",
        cancel_url="https://lookout.test/cancelled",
        customer_email="ada@example.com",
        metadata={"lookout_user_id": "usr_1"},
    )
    assert (session.status, session.payment_status) == ("open", "unpaid")
    assert session.url == f"{emulator.base}/checkout/{session.id}"
    assert session.lookout_subscription_id == "sub_abc"
    assert session.metadata["lookout_user_id"] == "usr_1"
    assert session.client_reference_id == "sub_abc" and session.subscription_id is None
    assert session.expires_at > session.created
    [create] = await emulator.requests("POST", "/v1/checkout/sessions")
    assert create["idempotency_key"] == "lookout-checkout-sub_abc"
    params = create["params"]
    assert params["mode"] == "subscription"
    assert params["success_url"] == "https://lookout.test/return/{CHECKOUT_SESSION_ID}"
    assert params["subscription_data"]["metadata"]["lookout_subscription_id"] == "sub_abc"
    assert params["line_items"] == [
        {"price": await provider.ensure_price(STANDARD), "quantity": "1"}
    ]
    # Asked again for the same local subscription (a retry): the same session.
    again = await provider.create_checkout_session(
        plan=STANDARD,
        lookout_subscription_id="sub_abc",
        success_url="https://lookout.test/return/{CHECKOUT_SESSION_ID}",
        cancel_url="https://lookout.test/cancelled",
        customer_email="ada@example.com",
        metadata={"lookout_user_id": "usr_1"},
    )
    assert again.id == session.id


async def test_paid_session_and_its_subscription(
    emulator: Stripe, provider: StripePaymentProvider
) -> None:
    session_id = await _checkout(provider, "sub_paid")
    await emulator.control(f"checkout/{session_id}/pay", {"deliver_webhooks": False})
    session = await provider.retrieve_checkout_session(session_id)
    assert session.is_paid and session.status == "complete" and session.url is None
    assert session.subscription_id is not None and session.customer_id is not None
    sub = await provider.retrieve_subscription(session.subscription_id)
    assert sub.status == "active" and sub.lookout_subscription_id == "sub_paid"
    assert sub.customer_id == session.customer_id and not sub.cancel_at_period_end
    assert sub.current_period_start is not None and sub.current_period_end is not None
    assert sub.current_period_end > sub.current_period_start
    assert sub.price_id == await provider.ensure_price(STANDARD)
    assert sub.price_lookup_key == price_lookup_key(STANDARD, "test")
    assert sub.latest_invoice_id is not None and sub.items


async def test_expire_checkout_session(emulator: Stripe, provider: StripePaymentProvider) -> None:
    open_id = await _checkout(provider, "sub_orphan")
    expired = await provider.expire_checkout_session(open_id)
    assert expired.status == "expired" and expired.url is None
    assert (await provider.expire_checkout_session(open_id)).status == "expired"
    paid_id = await _checkout(provider, "sub_raced")
    await emulator.control(f"checkout/{paid_id}/pay", {"deliver_webhooks": False})
    # Paid meanwhile: not expired, and the caller learns it from the status.
    assert (await provider.expire_checkout_session(paid_id)).status == "complete"
    with pytest.raises(PaymentProviderNotFound):
        await provider.expire_checkout_session("cs_test_missing")


async def test_cancel_at_period_end_and_back(
    emulator: Stripe, provider: StripePaymentProvider
) -> None:
    sub_id = await _paid(provider, emulator, "sub_cancel")
    cancelled = await provider.set_cancel_at_period_end(sub_id, True, idempotency_key="cancel-1")
    assert cancelled.cancel_at_period_end and cancelled.status == "active"
    assert cancelled.cancel_at == cancelled.current_period_end
    back = await provider.set_cancel_at_period_end(sub_id, False, idempotency_key="reactivate-1")
    assert not back.cancel_at_period_end and back.cancel_at is None
    updates = await emulator.requests("POST", f"/v1/subscriptions/{sub_id}")
    assert [(r["idempotency_key"], r["params"]) for r in updates] == [
        ("cancel-1", {"cancel_at_period_end": "true"}),
        ("reactivate-1", {"cancel_at_period_end": "false"}),
    ]


async def test_cancel_now_twice_reaches_stripe_once(
    emulator: Stripe, provider: StripePaymentProvider
) -> None:
    sub_id = await _paid(provider, emulator, "sub_failed")
    first = await provider.cancel_subscription_now(sub_id, idempotency_key="deprovision-sub_failed")
    second = await provider.cancel_subscription_now(
        sub_id, idempotency_key="deprovision-sub_failed"
    )
    assert first.status == second.status == "canceled" and first.canceled_at is not None
    deletes = await emulator.requests("DELETE", f"/v1/subscriptions/{sub_id}")
    assert [r["idempotency_key"] for r in deletes] == ["deprovision-sub_failed"] * 2
    assert [r["status"] for r in deletes] == [200, 404]  # one cancellation; then "No such"
    with pytest.raises(SubscriptionAlreadyCanceled):
        await provider.set_cancel_at_period_end(sub_id, True, idempotency_key="late-cancel")


async def test_missing_objects(provider: StripePaymentProvider) -> None:
    with pytest.raises(PaymentProviderNotFound):
        await provider.retrieve_subscription("sub_missing")
    with pytest.raises(PaymentProviderNotFound):
        await provider.cancel_subscription_now("sub_missing", idempotency_key="k")
    with pytest.raises(PaymentProviderNotFound):
        await provider.retrieve_checkout_session("cs_test_missing")


async def test_a_transient_failure_is_retried_with_the_same_key(
    emulator: Stripe, provider: StripePaymentProvider
) -> None:
    await provider.ensure_price(STANDARD)
    fault = {"method": "POST", "path": "/v1/checkout/sessions", "status": 500, "count": 1}
    await emulator.control("faults", fault)
    session_id = await _checkout(provider, "sub_retry")
    rows = await emulator.requests("POST", "/v1/checkout/sessions")
    assert [(r["status"], r["idempotency_key"]) for r in rows] == [
        (500, "lookout-checkout-sub_retry"),
        (200, "lookout-checkout-sub_retry"),
    ]
    assert session_id.startswith("cs_test_")


async def test_unavailable_and_refused(emulator: Stripe) -> None:
    await emulator.control("faults", {"path": "/v1/subscriptions", "status": 503, "count": 5})
    impatient = StripePaymentProvider(
        API_KEY, environment="test", api_base=emulator.base, max_network_retries=0
    )
    nobody = StripePaymentProvider(
        API_KEY,
        environment="test",
        api_base=f"http://127.0.0.1:{free_port()}",
        max_network_retries=0,
    )
    wrong_key = StripePaymentProvider("sk_test_wrong", environment="test", api_base=emulator.base)
    try:
        with pytest.raises(PaymentProviderUnavailable):
            await impatient.retrieve_subscription("sub_x")
        with pytest.raises(PaymentProviderUnavailable, match="retry later"):
            await nobody.retrieve_subscription("sub_x")
        with pytest.raises(PaymentProviderError, match="STRIPE_API_KEY") as refused:
            await wrong_key.retrieve_subscription("sub_x")
        assert not isinstance(refused.value, PaymentProviderUnavailable)
    finally:
        for p in (impatient, nobody, wrong_key):
            await p.aclose()
