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
