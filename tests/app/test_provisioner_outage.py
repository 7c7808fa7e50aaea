"""A provisioning server that stops answering for a while costs the customer a wait, not their
subscription: the operation waits (`waiting`, `operation.waiting`) and completes when the
server answers again, with the service's own retry settings."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

import anyio
import httpx
import pytest
from httpx_sse import aconnect_sse

from app.settings import Settings
from bench.chaos.proxy import fault_proxy, url_through
from tests.support.stack import running_stack, wait_for

pytestmark = pytest.mark.anyio

OUTAGE_SECONDS = 15


async def operation_events(http: httpx.AsyncClient, op_id: str) -> list[dict[str, Any]]:
    events = []
    async with aconnect_sse(http, "GET", f"/v1/operations/{op_id}/events") as source:
        async for sse in source.aiter_sse():
            if sse.data:
                data: dict[str, Any] = json.loads(sse.data)
                events.append(data)
    return events


@pytest.mark.timeout(120)
async def test_a_15_s_provisioner_outage_delays_the_provision_and_cancels_nothing(
    settings: Settings, pg_admin_dsn: str
) -> None:
    async with fault_proxy("provisioner", pg_admin_dsn) as proxy:
        await proxy.refuse()
        outage_began = time.monotonic()
        through_proxy = replace(
            settings, provisioner_database_urls=(url_through(pg_admin_dsn, proxy.port),)
        )
        async with running_stack(through_proxy) as stack:
            started = await stack.checkout("graph-standard", "patient")
            await stack.pay(started["checkout_session_id"])
            subscription_id = started["subscription_id"]

            async def waiting() -> dict[str, Any] | None:
                sub = await stack.subscription(subscription_id)
                if sub.get("operation_id") is None:
                    return None
                answer = await stack.http.get(f"/v1/operations/{sub['operation_id']}")
                snapshot: dict[str, Any] = answer.json()
                return snapshot if snapshot["status"] not in ("pending", "running") else None

            snapshot = await wait_for(waiting, within=OUTAGE_SECONDS, what="the provision to wait")
            assert snapshot["status"] == "waiting" and snapshot["error"] is None
            await anyio.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - outage_began)))
            assert (await stack.subscription(subscription_id))["status"] == "provisioning"

            await proxy.accept()
            back = time.monotonic()
            await stack.wait_for_status(subscription_id, "active", within=60)
            recovered = time.monotonic() - back
            print(
                f"\nMEASURED {OUTAGE_SECONDS} s outage, default retry policy: provisioner back"
                f" -> subscription active in {recovered:.2f} s"
            )
            events = await operation_events(stack.http, snapshot["id"])
            deletes = (
                await stack.emulator.get("/_emulator/requests", params={"method": "DELETE"})
            ).json()["data"]

    assert recovered < 10  # the next try comes within 5 s, then the remaining steps
    assert deletes == []  # nothing was cancelled in Stripe
    waits = [e for e in events if e["type"] == "operation.waiting"]
    assert waits and all(e["retry_at"].endswith("Z") for e in waits)
    assert waits[0]["message"].startswith("The database server is not answering; retrying in")
    types = [e["type"] for e in events]
    assert types[-1] == "operation.completed" and "operation.failed" not in types
    progress = [e["progress"] for e in events if "progress" in e]
    assert progress == sorted(progress)


@pytest.mark.timeout(180)
async def test_provisions_started_during_an_outage_all_complete_once_the_server_is_back(
    settings: Settings, pg_admin_dsn: str
) -> None:
    plans = ("graph-standard", "graph-standard", "graph-standard", "graph-large")
    async with fault_proxy("provisioner", pg_admin_dsn) as proxy:
        await proxy.refuse()
        through_proxy = replace(
            settings, provisioner_database_urls=(url_through(pg_admin_dsn, proxy.port),)
        )
        async with running_stack(through_proxy) as stack:
            subscriptions = []
            for number, plan in enumerate(plans):
                started = await stack.checkout(plan, f"waiting-{number}")
                await stack.pay(started["checkout_session_id"])
                subscriptions.append(started["subscription_id"])

            async def all_waiting() -> list[str] | None:
                ops = []
                for subscription_id in subscriptions:
                    sub = await stack.subscription(subscription_id)
                    if sub.get("operation_id") is None:
                        return None
                    answer = await stack.http.get(f"/v1/operations/{sub['operation_id']}")
                    if answer.json()["status"] != "waiting":
                        return None
                    ops.append(sub["operation_id"])
                return ops

            operations = await wait_for(all_waiting, within=60, what="every provision to wait")
            await proxy.accept()
            back = time.monotonic()
            for subscription_id in subscriptions:
                await stack.wait_for_status(subscription_id, "active", within=120)
            recovered = time.monotonic() - back
            print(
                f"\nMEASURED provisioner back -> all {len(operations)} waiting operations"
                f" completed: {recovered:.2f} s"
            )
            for op_id in operations:
                snapshot = (await stack.http.get(f"/v1/operations/{op_id}")).json()
                assert snapshot["status"] == "completed", snapshot
                types = [e["type"] for e in await operation_events(stack.http, op_id)]
                assert types[-1] == "operation.completed" and "operation.failed" not in types
            deletes = (
                await stack.emulator.get("/_emulator/requests", params={"method": "DELETE"})
            ).json()["data"]
    assert deletes == []  # nothing was cancelled in Stripe
