"""Provisioning seen from outside: its stream, its failure, and what failure costs the customer."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import anyio
import asyncpg
import httpx
import pytest
from httpx_sse import aconnect_sse

from app.settings import Settings
from provisioning import GraphBackend
from tests.provisioning.support import HoldingBackend
from tests.support import free_port
from tests.support.stack import running_stack

pytestmark = pytest.mark.anyio


async def read_stream(
    http: httpx.AsyncClient, path: str, headers: dict[str, str] | None = None
) -> list[tuple[str, str, dict[str, Any]]]:
    """Reads an operation stream to its end: (id, event type, data) of each event."""
    events = []
    async with aconnect_sse(http, "GET", path, headers=headers or {}) as source:
        assert source.response.status_code == 200
        async for sse in source.aiter_sse():
            if not sse.data:  # the opening `retry:` field alone
                continue
            events.append((sse.id, sse.event, json.loads(sse.data)))
    return events


async def test_every_step_is_streamed_in_order_to_a_late_client(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        started = await stack.checkout("graph-standard", "streamed")
        await stack.pay(started["checkout_session_id"])
        active = await stack.wait_for_status(started["subscription_id"], "active")
        # The client comes after the end and still gets the whole story, then the stream ends.
        events = await read_stream(stack.http, f"/v1/operations/{active['operation_id']}/events")
        types = [t for _, t, _ in events]
        assert types[0] == "operation.started"
        assert types[-1] == "operation.completed"
        assert set(types[1:-1]) == {"operation.progress"}
        progress = [d["progress"] for _, t, d in events if t == "operation.progress"]
        assert progress == sorted(progress)
        assert events[-1][2]["progress"] == 100
        steps = list(dict.fromkeys(d["step"] for _, t, d in events if t == "operation.progress"))
        graph_steps = [s.name for s in GraphBackend("postgresql://unused/").steps("provision")]
        assert steps[-len(graph_steps) :] == graph_steps
        for _, event_type, data in events:
            assert data["type"] == event_type
            assert data["operation_id"] == active["operation_id"]
            assert data["ts"].endswith("Z")
        assert len({i for i, _, _ in events}) == len(events)

        # Asking again with the terminal event's id: nothing more to say.
        again = await stack.http.get(
            f"/v1/operations/{active['operation_id']}/events",
            headers={"Last-Event-ID": events[-1][0]},
        )
        assert again.status_code == 204


async def test_an_unreachable_provisioner_fails_after_the_retry_window_and_cancels_stripe_once(
    settings: Settings,
) -> None:
    refusing = replace(
        settings,
        provisioner_database_urls=(f"postgresql://lookout@127.0.0.1:{free_port()}/x",),
        provisioner_retry_seconds=2,
    )
    async with running_stack(refusing) as stack:
        started = await stack.checkout("graph-standard", "doomed")
        await stack.pay(started["checkout_session_id"])
        failed = await stack.wait_for_status(started["subscription_id"], "failed", within=50)
        operation = (await stack.http.get(f"/v1/operations/{failed['operation_id']}")).json()
        assert operation["status"] == "failed"
        assert operation["error"]
        assert "could not be reached" in operation["error"]
        assert "127.0.0.1" not in operation["error"]
        assert "postgresql://" not in operation["error"]
        assert "Traceback" not in operation["error"]

        events = await read_stream(stack.http, f"/v1/operations/{failed['operation_id']}/events")
        assert events[-1][1] == "operation.failed"
        assert "operation.waiting" in [event[1] for event in events]
        assert events[-1][2]["error"] == operation["error"]

        async with stack.app.state.services.pool.acquire() as conn:
            stripe_id = await conn.fetchval(
                "SELECT stripe_subscription_id FROM subscriptions WHERE id = $1", failed["id"]
            )
            audit = await conn.fetch(
                "SELECT kind FROM audit_log WHERE subject_id = $1 ORDER BY id", failed["id"]
            )
        deletes = (
            await stack.emulator.get(
                "/_emulator/requests",
                params={"method": "DELETE", "path": f"/v1/subscriptions/{stripe_id}"},
            )
        ).json()["data"]
        assert len(deletes) == 1
        assert deletes[0]["idempotency_key"]
        stripe_sub = (
            await stack.emulator.get(
                f"/v1/subscriptions/{stripe_id}",
                headers={"Authorization": f"Bearer {stack.settings.stripe_api_key}"},
            )
        ).json()
        assert stripe_sub["status"] == "canceled"
        kinds = [r["kind"] for r in audit]
        assert "subscription.failed" in kinds
        assert "stripe.canceled" in kinds


async def test_delete_stops_a_running_provisioning_and_leaves_nothing(settings: Settings) -> None:
    assert settings.database_url is not None
    holding = HoldingBackend(GraphBackend(settings.database_url), hold_at="apply_schema")
    async with running_stack(settings, backends=[holding]) as stack:
        started = await stack.checkout("graph-standard", "stopped")
        await stack.pay(started["checkout_session_id"])
        with anyio.fail_after(30):
            await holding.holding.wait()
        record = await stack.subscription(started["subscription_id"])
        operation_id = record["operation_id"]
        database = f"lookout_{record['resource_id']}"
        assert await database_exists(stack.settings, database)

        answer = await stack.http.delete(f"/v1/operations/{operation_id}")
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "cancelled"
        assert holding.released is False  # the step was interrupted, not finished
        assert not await database_exists(stack.settings, database)
        events = await read_stream(stack.http, f"/v1/operations/{operation_id}/events")
        assert [t for _, t, _ in events].count("operation.cancelled") == 1
        assert events[-1][1] == "operation.cancelled"
        # The customer is not charged for what they stopped.
        failed = await stack.wait_for_status(started["subscription_id"], "failed")
        assert failed["status"] == "failed"


async def database_exists(settings: Settings, name: str) -> bool:
    assert settings.database_url is not None
    conn = await asyncpg.connect(settings.database_url)
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()
