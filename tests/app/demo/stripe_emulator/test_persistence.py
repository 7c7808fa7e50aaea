"""The demo's emulator keeps its state across restarts (every table, counter and unfinished
webhook), and its controls ask for its key when it has one."""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from app.demo.stripe_emulator import create_emulator
from app.demo.stripe_emulator.persistence import StateFile, persist_after_changes
from tests.support import free_port, live_server

pytestmark = pytest.mark.anyio

KEY = "sk_test_persisted"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Hook:
    """A webhook receiver that refuses until told otherwise, counting each event it took."""

    def __init__(self) -> None:
        self.accept = False
        self.taken: list[str] = []

    def app(self) -> Starlette:
        async def webhook(request: Request) -> Response:
            if not self.accept:
                return Response("not now", 500)
            self.taken.append((await request.json())["id"])
            return Response("ok")

        return Starlette(routes=[Route("/hook", webhook, methods=["POST"])])


def emulator_in(path: Path, hook_url: str | None, port: int) -> tuple[Starlette, StateFile]:
    """As `lookout demo` builds it: mounted under /stripe, its state in `path`."""
    emulator = create_emulator(
        webhook_url=hook_url,
        webhook_secret="whsec_persisted",
        public_url=f"http://127.0.0.1:{port}/stripe",
        api_key=KEY,
        control_key=KEY,
        webhook_retry_base=30,  # no retry within the test: the restart delivers it
    )
    found = emulator.state.emulator
    store = StateFile(path, found.state, found.webhooks)
    store.load()

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        # A mounted app's own lifespan does not run: close its webhook client here.
        await found.webhooks.aclose()

    mounted = Mount("/stripe", persist_after_changes(emulator, store))
    return Starlette(routes=[mounted], lifespan=lifespan), store


async def buy(http: httpx.AsyncClient) -> dict[str, Any]:
    """A paid subscription, through the API and the pay control (as the checkout page does)."""
    price = await http.post(
        "/v1/prices",
        data={
            "currency": "usd",
            "unit_amount": "2900",
            "recurring[interval]": "month",
            "product_data[name]": "Graph Standard (test)",
        },
    )
    assert price.status_code == 200, price.text
    session = await http.post(
        "/v1/checkout/sessions",
        data={
            "mode": "subscription",
            "line_items[0][price]": price.json()["id"],
            "line_items[0][quantity]": "1",
            "success_url": "https://lookout.test/done",
        },
        headers={"Idempotency-Key": "buy-once"},
    )
    assert session.status_code == 200, session.text
    paid = await http.post(f"/_emulator/checkout/{session.json()['id']}/pay", json={})
    assert paid.status_code == 200, paid.text
    subscription: dict[str, Any] = (
        await http.get(f"/v1/subscriptions/{paid.json()['object']['subscription']}")
    ).json()
    return subscription


async def test_a_restarted_emulator_knows_what_it_knew_and_delivers_what_was_left(
    tmp_path: Path,
) -> None:
    hook = Hook()
    path = tmp_path / "stripe_emulator.pickle"
    async with live_server(hook.app()) as hook_base:
        port = free_port()
        first, _ = emulator_in(path, f"{hook_base}/hook", port)
        async with (
            live_server(first, port=port) as base,
            httpx.AsyncClient(base_url=f"{base}/stripe", headers=AUTH) as http,
        ):
            sub = await buy(http)
            invoices = (await http.get("/v1/invoices")).json()["data"]
            events = (await http.get("/_emulator/events")).json()["data"]
            assert events and all(e["delivery"] != "delivered" for e in events)
        assert path.exists()
        assert os.stat(path).st_mode & 0o777 == 0o600

        hook.accept = True
        port = free_port()
        second, _ = emulator_in(path, f"{hook_base}/hook", port)
        async with (
            live_server(second, port=port) as base,
            httpx.AsyncClient(base_url=f"{base}/stripe", headers=AUTH) as http,
        ):
            again = await http.get(f"/v1/subscriptions/{sub['id']}")
            assert again.status_code == 200, again.text
            assert again.json() == sub
            assert (await http.get("/v1/invoices")).json()["data"] == invoices
            # A new invoice number follows the old ones: counters are kept too.
            renewed = await http.post(f"/_emulator/subscriptions/{sub['id']}/renew", json={})
            assert renewed.status_code == 200, renewed.text
            numbers = [i["number"] for i in (await http.get("/v1/invoices")).json()["data"]]
            assert len(set(numbers)) == len(numbers) == len(invoices) + 1
            # Cancel works on the restored subscription, and its event goes out.
            cancel = await http.post(
                f"/v1/subscriptions/{sub['id']}", data={"cancel_at_period_end": "true"}
            )
            assert cancel.status_code == 200, cancel.text
            drained = await http.post("/_emulator/webhooks/drain", json={"timeout": 20})
            assert drained.json() == {"drained": True}
            # Every event of the first run reached the receiver after the restart.
            assert {e["id"] for e in events} <= set(hook.taken)


async def test_an_unreadable_state_file_is_set_aside_and_the_emulator_starts_empty(
    tmp_path: Path,
) -> None:
    path = tmp_path / "stripe_emulator.pickle"
    path.write_bytes(b"not a pickle")
    emulator = create_emulator(webhook_url=None, webhook_secret="whsec_x", public_url="http://x")
    found = emulator.state.emulator
    assert StateFile(path, found.state, found.webhooks).load() is False
    assert found.state.objects == {}
    assert (tmp_path / "stripe_emulator.pickle.unreadable").read_bytes() == b"not a pickle"


async def test_the_controls_ask_for_the_key_when_the_emulator_has_one(tmp_path: Path) -> None:
    port = free_port()
    emulator, _ = emulator_in(tmp_path / "state.pickle", None, port)
    async with (
        live_server(emulator, port=port) as base,
        httpx.AsyncClient(base_url=f"{base}/stripe") as http,
    ):
        for method, path in [
            ("GET", "/_emulator/events"),
            ("POST", "/_emulator/checkout/cs_test_x/pay"),
            ("POST", "/_emulator/subscriptions/sub_x/portal_cancel"),
            ("POST", "/_emulator/faults"),
            ("POST", "/_emulator/a-control-added-later"),
        ]:
            for headers in (
                {},
                {"Authorization": "Bearer sk_test_wrong"},
                {"Authorization": f"Bearer {KEY}x"},
            ):
                refused = await http.request(method, path, headers=headers, json={})
                assert refused.status_code == 401, (method, path, headers)
                assert "secret key" in refused.json()["error"]["message"]
        ok = await http.get("/_emulator/events", headers=AUTH)
        assert ok.status_code == 200
        basic = base64.b64encode(f"{KEY}:".encode()).decode()
        ok = await http.get("/_emulator/events", headers={"Authorization": f"Basic {basic}"})
        assert ok.status_code == 200
        # The hosted checkout page is the customer's, not a control: no key there.
        assert (await http.get("/checkout/cs_test_unknown")).status_code == 404
