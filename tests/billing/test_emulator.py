"""The Stripe emulator on a real socket, driven through Stripe's own SDK and wire format; its
webhooks verified by `stripe.Webhook.construct_event` in a live receiver."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import stripe
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.billing.stripe_provider import StripeHTTPXClient
from app.stripe_emulator import API_VERSION, create_emulator
from app.stripe_emulator.forms import parse_pairs
from tests.support import free_port, live_server

pytestmark = pytest.mark.anyio

SECRET = "whsec_emulator_test"
API_KEY = "sk_test_emulator"


@dataclass
class Receiver:
    """A webhook endpoint that verifies signatures the way Lookout must, and can fail on cue."""

    secrets: list[str]
    fail_first: int = 0
    calls: int = 0
    events: list[stripe.Event] = field(default_factory=list)
    rejected: int = 0

    def app(self) -> Starlette:
        async def webhook(request: Request) -> Response:
            body = await request.body()
            self.calls += 1
            if self.calls <= self.fail_first:
                return Response("not now", 500)
            for secret in self.secrets:
                try:
                    event = stripe.Webhook.construct_event(
                        body, request.headers.get("stripe-signature"), secret
                    )
                except stripe.SignatureVerificationError:
                    continue
                self.events.append(event)
                return Response("ok")
            self.rejected += 1
            return Response("bad signature", 400)

        return Starlette(routes=[Route("/webhook", webhook, methods=["POST"])])

    def types(self) -> list[str]:
        return [e.type for e in self.events]


@dataclass
class Env:
    base: str
    http: httpx.AsyncClient
    sdk: stripe.StripeClient
    receiver: Receiver

    async def control(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = await self.http.post(f"{self.base}/_emulator/{path}", json=body or {})
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    async def drain(self) -> None:
        response = await self.http.post(f"{self.base}/_emulator/webhooks/drain", json={})
        assert response.json() == {"drained": True}

    async def requests(self, method: str, path: str) -> list[dict[str, Any]]:
        query = {"method": method, "path": path}
        rows: list[dict[str, Any]] = (
            await self.http.get(f"{self.base}/_emulator/requests", params=query)
        ).json()["data"]
        return rows


@pytest.fixture
def receiver() -> Receiver:
    return Receiver([SECRET])


@pytest.fixture
async def env(receiver: Receiver) -> AsyncIterator[Env]:
    async with live_server(receiver.app()) as hook_base:
        port = free_port()
        emulator = create_emulator(
            webhook_url=f"{hook_base}/webhook",
            webhook_secret=SECRET,
            public_url=f"http://127.0.0.1:{port}",
            api_key=API_KEY,
            webhook_retry_base=0.02,
        )
        async with live_server(emulator, port=port) as base, httpx.AsyncClient() as http:
            transport = StripeHTTPXClient()
            sdk = stripe.StripeClient(
                API_KEY,
                base_addresses={"api": base},
                stripe_version=API_VERSION,
                http_client=transport,
            )
            try:
                yield Env(base, http, sdk, receiver)
            finally:
                await transport.close_async()  # type: ignore[no-untyped-call]


async def _paid_subscription(env: Env, *, deliver: bool = True) -> tuple[str, str]:
    price = await env.sdk.v1.prices.create_async(
        params={
            "currency": "usd",
            "unit_amount": 2900,
            "recurring": {"interval": "month"},
            "product_data": {"name": "Graph Standard (test)"},
        }
    )
    session = await env.sdk.v1.checkout.sessions.create_async(
        params={
            "mode": "subscription",
            "line_items": [{"price": price.id, "quantity": 1}],
            "success_url": "https://lookout.test/done?session={CHECKOUT_SESSION_ID}",
            "metadata": {"lookout_subscription_id": "sub_local"},
            "subscription_data": {"metadata": {"lookout_subscription_id": "sub_local"}},
        }
    )
    paid = await env.control(f"checkout/{session.id}/pay", {"deliver_webhooks": deliver})
    return session.id, paid["object"]["subscription"]


def test_form_parsing_follows_stripe_bracket_notation() -> None:
    pairs = [
        ("line_items[0][price]", "price_a"),
        ("line_items[0][quantity]", "1"),
        ("line_items[1][price]", "price_b"),
        ("lookup_keys[]", "k1"),
        ("lookup_keys[]", "k2"),
        ("expand[0]", "subscription"),
        ("metadata[7]", "seven"),
        ("subscription_data[metadata][lookout_subscription_id]", "sub_1"),
    ]
    assert parse_pairs(pairs) == {
        "line_items": [{"price": "price_a", "quantity": "1"}, {"price": "price_b"}],
        "lookup_keys": ["k1", "k2"],
        "expand": ["subscription"],
        "metadata": {"7": "seven"},
        "subscription_data": {"metadata": {"lookout_subscription_id": "sub_1"}},
    }


async def test_raw_wire_format_lookup_keys_and_idempotency(env: Env) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}", "Idempotency-Key": "price-key-1"}
    form = (
        "currency=usd&unit_amount=900&recurring[interval]=month&lookup_key=lk_reader"
        "&product_data[name]=Repository+Reader&metadata[plan]=repository-reader"
    )
    headers = {**auth, "Content-Type": "application/x-www-form-urlencoded"}
    first = await env.http.post(f"{env.base}/v1/prices", content=form, headers=headers)
    again = await env.http.post(f"{env.base}/v1/prices", content=form, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.content == first.content
    assert again.headers["Idempotent-Replayed"] == "true"
    price = first.json()
    assert price["object"] == "price" and price["lookup_key"] == "lk_reader"
    assert price["recurring"]["interval"] == "month" and price["metadata"] == {
        "plan": "repository-reader"
    }
    listed = await env.http.get(
        f"{env.base}/v1/prices?lookup_keys[]=lk_reader&lookup_keys[]=other", headers=auth
    )
    assert [p["id"] for p in listed.json()["data"]] == [price["id"]]
    assert listed.json()["object"] == "list"

    conflict = await env.http.post(
        f"{env.base}/v1/prices", content=form.replace("900", "901"), headers=headers
    )
    assert conflict.status_code == 400
    assert conflict.json()["error"]["type"] == "idempotency_error"
    rows = await env.requests("POST", "/v1/prices")
    assert [(r["idempotency_key"], r["idempotent_replayed"]) for r in rows] == [
        ("price-key-1", False),
        ("price-key-1", True),
        ("price-key-1", False),
    ]
    assert rows[0]["params"]["product_data"] == {"name": "Repository Reader"}


async def test_errors_are_stripe_shaped(env: Env) -> None:
    anonymous = await env.http.get(f"{env.base}/v1/prices")
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(stripe.InvalidRequestError) as missing:
        await env.sdk.v1.subscriptions.retrieve_async("sub_nope")
    assert missing.value.http_status == 404
    assert missing.value.code == "resource_missing"
    typo: Any = {"emial": "x@example.com"}  # what the SDK's types would have caught
    with pytest.raises(stripe.InvalidRequestError) as unknown:
        await env.sdk.v1.customers.create_async(params=typo)
    assert unknown.value.code == "parameter_unknown"
    assert unknown.value.param == "emial"
    with pytest.raises(stripe.InvalidRequestError) as bad_mode:
        await env.sdk.v1.checkout.sessions.create_async(params={"success_url": "https://x.test"})
    assert bad_mode.value.code == "parameter_missing"
    assert bad_mode.value.param == "mode"


async def test_hosted_page_pays_and_redirects_to_success_url(env: Env) -> None:
    price = await env.sdk.v1.prices.create_async(
        params={
            "currency": "usd",
            "unit_amount": 7900,
            "recurring": {"interval": "month"},
            "product_data": {"name": "Graph Large (test)"},
        }
    )
    session = await env.sdk.v1.checkout.sessions.create_async(
        params={
            "mode": "subscription",
            "line_items": [{"price": price.id, "quantity": 1}],
            "success_url": "https://lookout.test/return?id={CHECKOUT_SESSION_ID}",
            "cancel_url": "https://lookout.test/cancelled",
            "customer_email": "ada@example.com",
            "client_reference_id": "sub_local_1",
            "metadata": {"lookout_subscription_id": "sub_local_1"},
            "subscription_data": {"metadata": {"lookout_subscription_id": "sub_local_1"}},
        }
    )
    assert session.url == f"{env.base}/checkout/{session.id}"
    assert session.status == "open" and session.payment_status == "unpaid"
    page = await env.http.get(session.url)
    assert page.status_code == 200
    assert "Graph Large (test)" in page.text and "79.00 USD" in page.text
    assert "ada@example.com" in page.text and "https://lookout.test/cancelled" in page.text
    paid = await env.http.post(f"{session.url}/pay", data={"email": "ada@example.com"})
    assert paid.status_code == 303
    assert paid.headers["location"] == f"https://lookout.test/return?id={session.id}"

    done = await env.sdk.v1.checkout.sessions.retrieve_async(
        session.id, params={"expand": ["subscription"]}
    )
    assert (done.status, done.payment_status, done.url) == ("complete", "paid", None)
    sub = done.subscription
    assert isinstance(sub, stripe.Subscription)
    assert sub.status == "active"
    assert sub.metadata is not None and sub.metadata.to_dict() == {
        "lookout_subscription_id": "sub_local_1"
    }
    item = sub.items.data[0]
    assert item.price.id == price.id and item.current_period_end > item.current_period_start
    invoice = await env.sdk.v1.invoices.retrieve_async(str(sub.latest_invoice))
    assert invoice.status == "paid" and invoice.amount_paid == 7900
    assert invoice.parent is not None and invoice.parent.subscription_details is not None
    assert invoice.parent.subscription_details.subscription == sub.id
    customer = await env.sdk.v1.customers.retrieve_async(str(done.customer))
    assert customer.email == "ada@example.com"
    # Paying twice (a double click) changes nothing.
    again = await env.http.post(f"{session.url}/pay", data={})
    assert again.status_code == 303
    assert len((await env.sdk.v1.subscriptions.list_async()).data) == 1


async def test_webhooks_are_signed_like_stripe_and_verify(env: Env) -> None:
    session_id, sub_id = await _paid_subscription(env)
    await env.drain()
    receiver = env.receiver
    assert receiver.rejected == 0
    flow = [t for t in receiver.types() if t not in ("price.created", "product.created")]
    assert flow == [
        "customer.created",
        "invoice.created",
        "invoice.finalized",
        "customer.subscription.created",
        "invoice.paid",
        "invoice.payment_succeeded",
        "checkout.session.completed",
    ]  # creation order, as delivered in order to a receiver that answers 2xx
    by_type = {e.type: e for e in receiver.events}
    completed = by_type["checkout.session.completed"]
    assert completed.api_version == API_VERSION and completed.object == "event"
    obj = completed.data.object
    assert obj["id"] == session_id and obj["payment_status"] == "paid"
    assert obj["subscription"] == sub_id
    assert obj["metadata"].to_dict() == {"lookout_subscription_id": "sub_local"}
    created = by_type["customer.subscription.created"].data.object
    # Stripe's current order: created once paid, so active at once and never updated from
    # incomplete (2025-03-31.basil: "Subscriptions are now created after the user completes
    # payment").
    assert created["status"] == "active" and created["latest_invoice"] == obj["invoice"]
    assert "customer.subscription.updated" not in by_type
    assert len({e.id for e in receiver.events}) == len(receiver.events)


async def test_a_forged_signature_is_refused_by_the_receiver(env: Env) -> None:
    await env.http.put(f"{env.base}/_emulator/webhooks", json={"secrets": ["whsec_wrong"]})
    await _paid_subscription(env)
    drained = await env.http.post(f"{env.base}/_emulator/webhooks/drain", json={"timeout": 0.3})
    assert drained.status_code == 504  # every delivery is refused and waits for a retry
    assert env.receiver.events == [] and env.receiver.rejected > 0


async def test_rotated_secrets_sign_with_both(env: Env) -> None:
    env.receiver.secrets = ["whsec_new"]
    await env.http.put(f"{env.base}/_emulator/webhooks", json={"secrets": ["whsec_new", SECRET]})
    await _paid_subscription(env)
    await env.drain()
    assert env.receiver.rejected == 0 and "checkout.session.completed" in env.receiver.types()
    events = (await env.http.get(f"{env.base}/_emulator/events")).json()["data"]
    assert all(e["delivery"] == "delivered" for e in events)


async def test_failed_deliveries_are_retried_with_backoff(env: Env) -> None:
    env.receiver.fail_first = 3
    await _paid_subscription(env)
    await env.drain()
    summary = (await env.http.get(f"{env.base}/_emulator/events")).json()["data"]
    assert all(e["delivery"] == "delivered" for e in summary)
    retried = [e for e in summary if len(e["attempts"]) > 1]
    assert sum(len(e["attempts"]) - 1 for e in retried) == 3
    assert all(a["status"] == 500 for e in retried for a in e["attempts"][:-1])
    assert sorted(e.id for e in env.receiver.events) == sorted(e["id"] for e in summary)


async def test_held_and_paused_deliveries(env: Env) -> None:
    session_id, _sub = await _paid_subscription(env, deliver=False)
    await env.drain()
    # Only the events of the API calls went out; those of the payment are held.
    assert set(env.receiver.types()) == {"price.created", "product.created"}
    await env.control("webhooks/pause")
    assert (await env.control("webhooks/release"))["released"] >= 7
    drained = await env.http.post(f"{env.base}/_emulator/webhooks/drain", json={"timeout": 0.2})
    assert drained.json() == {"drained": False}
    assert "checkout.session.completed" not in env.receiver.types()
    await env.control("webhooks/resume")
    await env.drain()
    assert "checkout.session.completed" in env.receiver.types()
    # A resend delivers the same event again: receivers must treat it as a duplicate.
    completed = next(e for e in env.receiver.events if e.type == "checkout.session.completed")
    resent = await env.control(f"events/{completed.id}/deliver")
    assert resent["status"] == 200
    assert [e.id for e in env.receiver.events].count(completed.id) == 2
    assert completed.data.object["id"] == session_id


async def test_subscription_lifecycle_controls(env: Env) -> None:
    _session, sub_id = await _paid_subscription(env)
    cancel = await env.control(f"subscriptions/{sub_id}/portal_cancel")
    assert cancel["object"]["cancel_at_period_end"] is True
    assert [e["type"] for e in cancel["events"]] == ["customer.subscription.updated"]
    reactivate = await env.control(f"subscriptions/{sub_id}/portal_reactivate")
    assert reactivate["object"]["cancel_at_period_end"] is False
    failed = await env.control(f"subscriptions/{sub_id}/renew", {"outcome": "failed"})
    assert failed["object"]["status"] == "past_due"
    assert "invoice.payment_failed" in [e["type"] for e in failed["events"]]
    recovered = await env.control(f"subscriptions/{sub_id}/pay_invoice")
    assert recovered["object"]["status"] == "active"
    await env.control(f"subscriptions/{sub_id}/portal_cancel")
    ended = await env.control(f"subscriptions/{sub_id}/renew")
    assert ended["object"]["status"] == "canceled"
    assert [e["type"] for e in ended["events"]] == ["customer.subscription.deleted"]
    await env.drain()
    updates = [e for e in env.receiver.events if e.type == "customer.subscription.updated"]
    previous = [e.data.to_dict()["previous_attributes"] for e in updates]
    assert {"cancel_at_period_end": False} in [
        {k: v for k, v in p.items() if k == "cancel_at_period_end"} for p in previous
    ]
    renewal = next(p for p in previous if "items" in p)
    assert renewal["status"] == "active" and "latest_invoice" in renewal


async def test_expired_session(env: Env) -> None:
    price = await env.sdk.v1.prices.create_async(
        params={
            "currency": "usd",
            "unit_amount": 900,
            "recurring": {"interval": "month"},
            "product_data": {"name": "Repository Reader"},
        }
    )
    session = await env.sdk.v1.checkout.sessions.create_async(
        params={"mode": "subscription", "line_items": [{"price": price.id, "quantity": 1}]}
    )
    expired = await env.sdk.v1.checkout.sessions.expire_async(session.id)
    assert expired.status == "expired"
    with pytest.raises(stripe.InvalidRequestError):
        await env.sdk.v1.checkout.sessions.expire_async(session.id)
    page = await env.http.get(f"{env.base}/checkout/{session.id}")
    assert page.status_code == 410
    await env.drain()
    assert "checkout.session.expired" in env.receiver.types()


async def test_injected_fault_and_sdk_retry(env: Env) -> None:
    fault = {"method": "POST", "path": "/v1/customers", "status": 500, "count": 1}
    await env.control("faults", fault)
    transport = StripeHTTPXClient()
    retrying = stripe.StripeClient(
        API_KEY, base_addresses={"api": env.base}, max_network_retries=2, http_client=transport
    )
    try:
        customer = await retrying.v1.customers.create_async(
            params={"email": "x@example.com"}, options={"idempotency_key": "cust-1"}
        )
    finally:
        await transport.close_async()  # type: ignore[no-untyped-call]
    rows = await env.requests("POST", "/v1/customers")
    assert [(r["status"], r["idempotency_key"]) for r in rows] == [(500, "cust-1"), (200, "cust-1")]
    assert customer.email == "x@example.com"


def test_runs_standalone() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app.stripe_emulator", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert "--webhook-url" in result.stdout and "--port" in result.stdout


async def test_delayed_payment_pause_and_payment_method_events(env: Env) -> None:
    price = await env.sdk.v1.prices.create_async(
        params={
            "currency": "usd",
            "unit_amount": 4900,
            "recurring": {"interval": "month"},
            "product_data": {"name": "Repository Team"},
        }
    )
    session = await env.sdk.v1.checkout.sessions.create_async(
        params={"mode": "subscription", "line_items": [{"price": price.id, "quantity": 1}]}
    )
    pending = await env.control(f"checkout/{session.id}/pay", {"async_payment": True})
    assert (pending["object"]["status"], pending["object"]["payment_status"]) == (
        "complete",
        "unpaid",
    )
    sub_id = pending["object"]["subscription"]
    assert (await env.sdk.v1.subscriptions.retrieve_async(sub_id)).status == "incomplete"
    settled = await env.control(f"checkout/{session.id}/async_payment", {"succeeded": True})
    assert settled["object"]["payment_status"] == "paid"
    assert "checkout.session.async_payment_succeeded" in [e["type"] for e in settled["events"]]
    assert (await env.sdk.v1.subscriptions.retrieve_async(sub_id)).status == "active"

    paused = await env.control(f"subscriptions/{sub_id}/status", {"status": "paused"})
    assert [e["type"] for e in paused["events"]] == [
        "customer.subscription.updated",
        "customer.subscription.paused",
    ]
    resumed = await env.control(f"subscriptions/{sub_id}/status", {"status": "active"})
    assert [e["type"] for e in resumed["events"]][-1] == "customer.subscription.resumed"
    customer = pending["object"]["customer"]
    attached = await env.control(f"customers/{customer}/payment_method")
    assert attached["object"]["status"] == "succeeded"
    assert attached["object"]["customer"] == customer

    listed = await env.sdk.v1.events.list_async(
        params={"type": "customer.subscription.*", "limit": 100}
    )
    assert {e.type for e in listed.data} == {
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.paused",
        "customer.subscription.resumed",
    }
    await env.drain()
    assert "setup_intent.succeeded" in env.receiver.types()
    assert env.receiver.rejected == 0
