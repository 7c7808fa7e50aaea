"""The Stripe emulator on a real socket, driven through Stripe's own SDK and wire format; its
webhooks verified by `stripe.Webhook.construct_event` in a live receiver."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest
import stripe
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.billing.stripe.provider import StripeHTTPXClient
from app.demo.stripe_emulator import API_VERSION, create_emulator
from app.demo.stripe_emulator.forms import parse_pairs
from tests.support import free_port, live_server
from tests.support.stack import wait_for
from tests.support.stripe_events import FIXTURES

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


def _period_end(sub: dict[str, Any]) -> int:
    end: int = sub["items"]["data"][0]["current_period_end"]
    return end


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
        "payment_intent.created",
        "customer.subscription.created",
        "charge.succeeded",
        "payment_intent.succeeded",
        "invoice_payment.paid",
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
    # The portal of flexible billing mode: `cancel_at` at the period's end, and only that.
    assert cancel["object"]["cancel_at_period_end"] is False
    assert cancel["object"]["cancel_at"] == _period_end(cancel["object"])
    assert [e["type"] for e in cancel["events"]] == ["customer.subscription.updated"]
    reactivate = await env.control(f"subscriptions/{sub_id}/portal_reactivate")
    assert reactivate["object"]["cancel_at_period_end"] is False
    assert reactivate["object"]["cancel_at"] is None
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
    assert any("cancel_at" in p and p["cancel_at"] is None for p in previous)
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
        [sys.executable, "-m", "app.demo.stripe_emulator", "--help"],
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


async def test_cancel_at_takes_each_value_stripe_accepts_and_only_those(env: Env) -> None:
    _session, sub_id = await _paid_subscription(env)
    update = env.sdk.v1.subscriptions.update_async
    sub = (await env.sdk.v1.subscriptions.retrieve_async(sub_id)).to_dict()
    end = _period_end(sub)

    # A timestamp: that moment, and nothing about the period's end.
    chosen = end - 86400
    at = await update(sub_id, params={"cancel_at": chosen})
    assert (at.cancel_at, at.cancel_at_period_end) == (chosen, False)
    assert at.cancellation_details is not None
    assert at.cancellation_details.reason == "cancellation_requested"
    # cancel_at_period_end=false undoes only what cancel_at_period_end set: this one stays.
    kept = await update(sub_id, params={"cancel_at_period_end": False})
    assert (kept.cancel_at, kept.cancel_at_period_end) == (chosen, False)
    # "" unsets it.
    cleared = await update(sub_id, params={"cancel_at": ""})
    assert (cleared.cancel_at, cleared.cancel_at_period_end) == (None, False)
    assert cleared.cancellation_details is not None
    assert cleared.cancellation_details.reason is None

    # The helpers resolve at once to the earliest and latest item period end (one item here).
    for helper in ("min_period_end", "max_period_end"):
        resolved = await update(sub_id, params={"cancel_at": helper})
        assert (resolved.cancel_at, resolved.cancel_at_period_end) == (end, False)
        await update(sub_id, params={"cancel_at": ""})

    # cancel_at_period_end=true shows its date in cancel_at; "" unsets the whole of it.
    period = await update(sub_id, params={"cancel_at_period_end": True})
    assert (period.cancel_at, period.cancel_at_period_end) == (end, True)
    unset = await update(sub_id, params={"cancel_at": ""})
    assert (unset.cancel_at, unset.cancel_at_period_end) == (None, False)
    period = await update(sub_id, params={"cancel_at_period_end": True})
    undone = await update(sub_id, params={"cancel_at_period_end": False})
    assert (undone.cancel_at, undone.cancel_at_period_end) == (None, False)

    refused = {
        "cancel_at=yesterday": {"cancel_at": "yesterday"},
        "cancel_at in the past": {"cancel_at": sub["created"] - 60},
        "both at once": {"cancel_at": "", "cancel_at_period_end": False},
    }
    for case, params in refused.items():
        with pytest.raises(stripe.InvalidRequestError) as caught:
            await update(sub_id, params=params)  # type: ignore[arg-type]
        assert caught.value.http_status == 400, case
    unchanged = await env.sdk.v1.subscriptions.retrieve_async(sub_id)
    assert (unchanged.cancel_at, unchanged.cancel_at_period_end) == (None, False)

    # A subscription with a cancel_at ends when its period does.
    await update(sub_id, params={"cancel_at": "min_period_end"})
    ended = await env.control(f"subscriptions/{sub_id}/renew")
    assert ended["object"]["status"] == "canceled"
    assert ended["object"]["ended_at"] == end
    await env.drain()
    updates = [e for e in env.receiver.events if e.type == "customer.subscription.updated"]
    # One per change above (Checkout creates the subscription active: no update); the refused
    # and the no-op: none.
    assert len(updates) == 11


async def test_the_customer_portal_cancels_renews_updates_the_card_and_lists_invoices(
    env: Env,
) -> None:
    session_id, sub_id = await _paid_subscription(env)
    customer = (await env.sdk.v1.checkout.sessions.retrieve_async(session_id)).customer
    assert isinstance(customer, str)
    portal = await env.sdk.v1.billing_portal.sessions.create_async(
        params={"customer": customer, "return_url": "https://lookout.test/"}
    )
    assert portal.object == "billing_portal.session"
    assert portal.customer == customer and portal.return_url == "https://lookout.test/"
    page = await env.http.get(portal.url)
    assert page.status_code == 200
    assert "<script" not in page.text
    assert "Cancel subscription" in page.text and "Return to Lookout" in page.text
    invoice = (await env.sdk.v1.invoices.list_async(params={"customer": customer})).data[0]
    assert invoice.hosted_invoice_url and invoice.hosted_invoice_url in page.text
    hosted = await env.http.get(invoice.hosted_invoice_url)
    assert hosted.status_code == 200 and str(invoice.number) in hosted.text

    # Cancel: cancel_at at the period's end, cancel_at_period_end left false.
    form = f"{portal.url}/subscriptions/{sub_id}"
    cancelled = await env.http.post(f"{form}/cancel", follow_redirects=True)
    assert cancelled.status_code == 200 and "Renew subscription" in cancelled.text
    sub = await env.sdk.v1.subscriptions.retrieve_async(sub_id)
    assert (sub.cancel_at, sub.cancel_at_period_end) == (_period_end(sub.to_dict()), False)
    renewed = await env.http.post(f"{form}/renew", follow_redirects=True)
    assert "Cancel subscription" in renewed.text
    sub = await env.sdk.v1.subscriptions.retrieve_async(sub_id)
    assert (sub.cancel_at, sub.cancel_at_period_end) == (None, False)

    # A new card: attached, confirmed and made the default, each with its event.
    card_form = f"{portal.url}/payment_method"
    declined = await env.http.post(card_form, data={"card": "4000000000000002"})
    assert declined.status_code == 402
    saved = await env.http.post(
        card_form, data={"card": "5555 5555 5555 4444"}, follow_redirects=True
    )
    assert "ending in 4444" in saved.text
    owner = await env.sdk.v1.customers.retrieve_async(customer)
    assert owner.invoice_settings is not None
    assert str(owner.invoice_settings.default_payment_method).startswith("pm_")

    await env.drain()
    portal_events = [e.type for e in env.receiver.events][-5:]
    assert portal_events == [
        "customer.subscription.updated",
        "customer.subscription.updated",
        "payment_method.attached",
        "setup_intent.succeeded",
        "customer.updated",
    ]
    updated = env.receiver.events[-1].data.to_dict()
    assert updated["previous_attributes"]["invoice_settings"]["default_payment_method"] is None

    # Another customer's subscription, an unknown session, an unknown customer: refused.
    assert (await env.http.post(f"{portal.url}/subscriptions/sub_other/cancel")).status_code == 404
    assert (await env.http.get(f"{env.base}/p/session/test_nothing")).status_code == 404
    with pytest.raises(stripe.InvalidRequestError) as missing:
        await env.sdk.v1.billing_portal.sessions.create_async(params={"customer": "cus_nobody"})
    assert missing.value.http_status == 404
    with pytest.raises(stripe.InvalidRequestError):
        await env.sdk.v1.billing_portal.sessions.create_async(
            params={"customer": customer, "flow_data": {"type": "payment_method_update"}}
        )


# -- Stripe's strictness (issue 13): idempotency, expand[], order, refusals, retries, shapes ---


async def _raw(
    env: Env, method: str, path: str, form: str = "", key: str | None = None
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    if method == "GET":
        return await env.http.get(f"{env.base}{path}?{form}", headers=headers)
    headers["Content-Type"] = "application/x-www-form-urlencoded"
    return await env.http.request(method, f"{env.base}{path}", content=form, headers=headers)


async def test_an_error_once_executing_is_saved_and_replayed(env: Env) -> None:
    first = await _raw(env, "POST", "/v1/subscriptions/sub_gone", "metadata[a]=b", key="upd-1")
    assert first.status_code == 404 and "Idempotent-Replayed" not in first.headers
    again = await _raw(env, "POST", "/v1/subscriptions/sub_gone", "metadata[a]=b", key="upd-1")
    assert again.status_code == 404 and again.content == first.content
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Original-Request"] == first.headers["Request-Id"]
    # A request refused by parameter validation never began executing: nothing is saved, and
    # the same key with the parameters put right goes through.
    typo = await _raw(env, "POST", "/v1/customers", "emial=a%40example.com", key="cust-1")
    assert typo.status_code == 400 and typo.json()["error"]["code"] == "parameter_unknown"
    fixed = await _raw(env, "POST", "/v1/customers", "email=a%40example.com", key="cust-1")
    assert fixed.status_code == 200 and "Idempotent-Replayed" not in fixed.headers


async def test_a_duplicate_while_the_first_is_executing_gets_409(env: Env) -> None:
    slow = {"method": "POST", "path": "/v1/customers", "status": 200, "count": 1, "delay": 1.0}
    await env.control("faults", slow)
    async with anyio.create_task_group() as tasks:
        answers: dict[str, httpx.Response] = {}

        async def first() -> None:
            answers["first"] = await _raw(env, "POST", "/v1/customers", "email=x", key="dup")

        tasks.start_soon(first)
        await wait_for(lambda: env.requests("POST", "/v1/customers"), what="the first request")
        answers["second"] = await _raw(env, "POST", "/v1/customers", "email=x", key="dup")
    second = answers["second"]
    assert second.status_code == 409
    assert second.json()["error"]["code"] == "idempotency_key_in_use"
    assert second.headers["Stripe-Should-Retry"] == "true"
    assert answers["first"].status_code == 200
    third = await _raw(env, "POST", "/v1/customers", "email=x", key="dup")
    assert third.headers["Idempotent-Replayed"] == "true"
    assert third.json()["id"] == answers["first"].json()["id"]


async def test_an_unknown_expand_path_is_refused(env: Env) -> None:
    session_id, sub_id = await _paid_subscription(env)
    path = f"/v1/checkout/sessions/{session_id}"
    for bad in ("nope", "status", "metadata", "subscription.nope", "a.b.c.d.e"):
        answer = await _raw(env, "GET", path, f"expand[]={bad}")
        assert answer.status_code == 400, bad
        assert answer.json()["error"]["param"] == "expand"
    good = await _raw(env, "GET", path, "expand[]=subscription.latest_invoice&expand[]=customer")
    assert good.status_code == 200
    assert good.json()["subscription"]["latest_invoice"]["object"] == "invoice"
    listed = await _raw(env, "GET", "/v1/subscriptions", "expand[]=data.customer")
    assert listed.json()["data"][0]["customer"]["object"] == "customer"
    assert (await _raw(env, "GET", "/v1/subscriptions", "expand[]=customer")).status_code == 400
    updated = await _raw(env, "POST", f"/v1/subscriptions/{sub_id}", "expand[]=plan")
    assert updated.status_code == 400


async def test_checkout_creates_the_subscription_only_once_paid(env: Env) -> None:
    price = await env.sdk.v1.prices.create_async(
        params={
            "currency": "usd",
            "unit_amount": 2900,
            "recurring": {"interval": "month"},
            "product_data": {"name": "Graph Standard (test)"},
        }
    )
    session = await env.sdk.v1.checkout.sessions.create_async(
        params={"mode": "subscription", "line_items": [{"price": price.id, "quantity": 1}]}
    )
    assert session.subscription is None and session.invoice is None
    assert (await env.sdk.v1.subscriptions.list_async(params={"status": "all"})).data == []
    paid = await env.control(f"checkout/{session.id}/pay")
    types = [e["type"] for e in paid["events"]]
    assert types.index("customer.subscription.created") < types.index("invoice.paid")
    assert types[-1] == "checkout.session.completed"
    assert "customer.subscription.updated" not in types
    created_id = paid["events"][types.index("customer.subscription.created")]["id"]
    created = (await env.sdk.v1.events.retrieve_async(created_id)).data.object
    assert created["status"] == "active"


async def test_a_failed_async_payment_ends_the_subscription_incomplete_expired(env: Env) -> None:
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
    sub_id = pending["object"]["subscription"]
    assert (await env.sdk.v1.subscriptions.retrieve_async(sub_id)).status == "incomplete"
    bounced = await env.control(f"checkout/{session.id}/async_payment", {"succeeded": False})
    assert [e["type"] for e in bounced["events"]] == [
        "invoice.payment_failed",
        "invoice.voided",
        "customer.subscription.updated",
        "checkout.session.async_payment_failed",
    ]
    sub = await env.sdk.v1.subscriptions.retrieve_async(sub_id)
    assert sub.status == "incomplete_expired" and sub.ended_at is not None
    assert (await env.sdk.v1.invoices.retrieve_async(str(sub.latest_invoice))).status == "void"
    for path, body in [
        (f"subscriptions/{sub_id}/status", {"status": "active"}),
        (f"subscriptions/{sub_id}/pay_invoice", {}),
        (f"subscriptions/{sub_id}/renew", {}),
        (f"subscriptions/{sub_id}/portal_cancel", {}),
        (f"checkout/{session.id}/async_payment", {"succeeded": True}),
    ]:
        refused = await env.http.post(f"{env.base}/_emulator/{path}", json=body)
        assert refused.status_code == 400, path


async def test_controls_refuse_transitions_stripe_cannot_make(env: Env) -> None:
    _session, sub_id = await _paid_subscription(env)

    async def status(value: str) -> httpx.Response:
        return await env.http.post(
            f"{env.base}/_emulator/subscriptions/{sub_id}/status", json={"status": value}
        )

    for impossible in ("unpaid", "incomplete", "trialing", "incomplete_expired", "canceled"):
        answer = await status(impossible)
        assert answer.status_code == 400, impossible
        assert "goes to past_due, paused" in answer.json()["error"]["message"]
    paid_already = f"{env.base}/_emulator/subscriptions/{sub_id}/pay_invoice"
    assert (await env.http.post(paid_already)).status_code == 400
    await env.control(f"subscriptions/{sub_id}/renew", {"outcome": "failed"})
    assert (await status("unpaid")).status_code == 200  # the retries of a past_due one ran out
    assert (await status("paused")).status_code == 400
    await env.control(f"subscriptions/{sub_id}/portal_cancel", {"at_period_end": False})
    for after_the_end in ("active", "past_due"):
        assert (await status(after_the_end)).status_code == 400
    reactivate = f"{env.base}/_emulator/subscriptions/{sub_id}/portal_reactivate"
    assert (await env.http.post(reactivate)).status_code == 400


async def test_a_failing_endpoint_is_retried_on_stripes_schedule() -> None:
    receiver = Receiver([SECRET], fail_first=10**6)
    async with live_server(receiver.app()) as hook_base:
        port = free_port()
        emulator = create_emulator(
            webhook_url=f"{hook_base}/webhook",
            webhook_secret=SECRET,
            public_url=f"http://127.0.0.1:{port}",
            api_key=API_KEY,
            webhook_retry_base=0.0005,  # a minute of Stripe's schedule: half a millisecond
        )
        async with live_server(emulator, port=port) as base, httpx.AsyncClient() as http:
            auth = {"Authorization": f"Bearer {API_KEY}"}
            customer = await http.post(f"{base}/v1/customers", data={"email": "a@x"}, headers=auth)
            assert customer.status_code == 200
            drained = await http.post(f"{base}/_emulator/webhooks/drain", json={"timeout": 30})
            assert drained.json() == {"drained": True}
            [summary] = (await http.get(f"{base}/_emulator/events")).json()["data"]
    assert summary["delivery"] == "failed"
    attempts = summary["attempts"]
    assert all(a["status"] == 500 for a in attempts)
    delays = [a["retry_in"] for a in attempts[:-1]]
    assert delays == [60.0 * 2**n for n in range(12)]  # doubling from a minute...
    assert sum(delays) <= 3 * 86400 < sum(delays) + delays[-1] * 2  # ...for up to three days
    assert "retry_in" not in attempts[-1] and receiver.calls == 13


async def test_shuffled_delivery_is_late_and_out_of_order_yet_complete() -> None:
    receiver = Receiver([SECRET])
    async with live_server(receiver.app()) as hook_base:
        port = free_port()
        emulator = create_emulator(
            webhook_url=f"{hook_base}/webhook",
            webhook_secret=SECRET,
            public_url=f"http://127.0.0.1:{port}",
            api_key=API_KEY,
            webhook_shuffle_seed=1234,
            webhook_max_delay=0.2,
        )
        async with live_server(emulator, port=port) as base, httpx.AsyncClient() as http:
            auth = {"Authorization": f"Bearer {API_KEY}"}
            for n in range(20):
                await http.post(f"{base}/v1/customers", data={"email": f"{n}@x"}, headers=auth)
            assert (await http.post(f"{base}/_emulator/webhooks/drain", json={})).json() == {
                "drained": True
            }
            created = [e["id"] for e in (await http.get(f"{base}/_emulator/events")).json()["data"]]
    arrived = [e.id for e in receiver.events]
    assert sorted(arrived) == sorted(created)  # each exactly once
    assert arrived != created  # 20 events in creation order: 1 chance in 20! with seed 1234


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    return "number" if isinstance(value, int | float) else type(value).__name__


# Hashes whose keys are the caller's (metadata) or depend on the payment method.
_FREE_HASHES = frozenset({"metadata", "payment_method_options", "previous_attributes"})


# Properties Stripe includes only when asked (`expand[]`): a Charge's `refunds` since
# 2022-11-15. Stripe's examples show them expanded.
_INCLUDABLE = frozenset({"charge.refunds"})


def _shape_differences(stripe: Any, ours: Any, path: str) -> list[str]:
    """Keys of Stripe's example missing from ours, and values of another JSON type (where
    both are set), recursively; keys Stripe's example leaves out are allowed."""
    found = []
    for key, example in stripe.items():
        where = f"{path}.{key}"
        if key not in ours and where in _INCLUDABLE:
            continue
        if key not in ours:
            found.append(f"missing {where}")
            continue
        value = ours[key]
        if example is None or value is None or key in _FREE_HASHES:
            continue
        if _kind(example) != _kind(value):
            found.append(f"{where}: Stripe has {_kind(example)}, the emulator {_kind(value)}")
        elif isinstance(example, dict) and "object" not in example:
            found += _shape_differences(example, value, where)
        elif isinstance(example, list) and example and value and isinstance(example[0], dict):
            found += _shape_differences(example[0], value[0], f"{where}[0]")
    return found


def _objects_by_kind(obj: Any, into: dict[str, list[dict[str, Any]]]) -> None:
    """Every object (`{"object": kind, ...}`) inside an answer, nested ones included."""
    if isinstance(obj, list):
        for item in obj:
            _objects_by_kind(item, into)
    elif isinstance(obj, dict):
        kind = obj.get("object")
        if isinstance(kind, str) and kind not in ("list", "search_result"):
            into.setdefault(kind, []).append(obj)
        for value in obj.values():
            _objects_by_kind(value, into)


async def test_answers_have_the_shapes_of_stripes_own_objects(env: Env) -> None:
    session_id, sub_id = await _paid_subscription(env)
    await env.control(f"subscriptions/{sub_id}/renew", {"outcome": "failed"})
    customer = (await env.sdk.v1.subscriptions.retrieve_async(sub_id)).customer
    await env.control(f"customers/{customer}/payment_method")
    served: dict[str, list[dict[str, Any]]] = {}
    for path in (
        "/v1/customers/" + str(customer),
        "/v1/products",
        "/v1/prices",
        f"/v1/checkout/sessions/{session_id}",
        f"/v1/checkout/sessions/{session_id}/line_items",
        "/v1/subscriptions",
        "/v1/invoices",
        "/v1/events?limit=100",
    ):
        answer = await _raw(env, "GET", path.partition("?")[0], path.partition("?")[2])
        assert answer.status_code == 200, path
        _objects_by_kind(answer.json(), served)
    examples = json.loads(FIXTURES.read_text())["resources"]
    unknown = sorted(set(served) - set(examples))
    assert not unknown, f"add Stripe's example of {unknown} to {FIXTURES.name}"
    differences = [
        difference
        for kind, objects in served.items()
        for obj in objects
        for difference in _shape_differences(examples[kind], obj, kind)
    ]
    assert not differences, differences
    assert {"checkout.session", "subscription", "invoice", "event", "customer", "item"} <= set(
        served
    )
