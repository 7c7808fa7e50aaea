"""A process killed with SIGKILL loses nothing it acknowledged."""

from __future__ import annotations

import time

import asyncpg
import httpx
import pytest

from app.settings import Settings
from app.users import create_api_key, create_user
from tests.support.process import process_stripe, serve_process
from tests.support.stack import wait_for
from tests.support.stripe_events import deliver

pytestmark = pytest.mark.anyio


@pytest.mark.timeout(120)
async def test_an_event_acknowledged_by_a_killed_process_is_processed_after_restart(
    settings: Settings,
) -> None:
    assert settings.database_url is not None
    db = await asyncpg.connect(settings.database_url)
    user = await create_user(db, "crash@example.com")
    key = await create_api_key(db, user.id)

    async def event_status(event_id: str) -> str | None:
        status: str | None = await db.fetchval(
            "SELECT status FROM webhook_events WHERE id = $1", event_id
        )
        return status

    try:
        async with process_stripe(settings) as stripe:
            control, secret = stripe.control, stripe.secret
            auth = {"Authorization": f"Bearer {key}"}
            async with (
                serve_process(stripe.settings, port=stripe.port) as first,
                httpx.AsyncClient(base_url=first.url, headers=auth) as http,
            ):
                started = (
                    await http.post(
                        "/v1/checkout", json={"plan": "graph-standard", "resource_name": "crash"}
                    )
                ).json()
                await control.post(f"/_emulator/checkout/{started['checkout_session_id']}/pay")

                async def active() -> bool:
                    answer = await http.get(f"/v1/subscriptions/{started['subscription_id']}")
                    return bool(answer.json()["status"] == "active")

                await wait_for(active, what="the subscription to be active")
                stripe_id = await db.fetchval(
                    "SELECT stripe_subscription_id FROM subscriptions WHERE id = $1",
                    started["subscription_id"],
                )
                cancelled = (
                    await control.post(
                        f"/_emulator/subscriptions/{stripe_id}/portal_cancel",
                        json={"deliver_webhooks": False},
                    )
                ).json()
                event_id = cancelled["events"][-1]["id"]
                event = (await control.get(f"/_emulator/events/{event_id}")).json()["event"]
                # Stripe answers slowly: the handler is still waiting when the process dies.
                await control.post(
                    "/_emulator/faults",
                    json={
                        "method": "GET",
                        "path": "/v1/subscriptions/",
                        "status": 200,
                        "delay": 60,
                        "count": 1,
                    },
                )
                acknowledged = await deliver(http, event, secret)
                assert acknowledged.status_code == 200

                async def processing() -> bool:
                    return await event_status(event_id) == "processing"

                await wait_for(processing, what="the event to be claimed")
                first.kill()
            await control.delete("/_emulator/faults")
            assert await event_status(event_id) == "processing"

            restarted_at = time.monotonic()
            async with (
                serve_process(stripe.settings, port=stripe.port) as second,
                httpx.AsyncClient(base_url=second.url, headers=auth) as http,
            ):

                async def cancel_flag() -> bool:
                    answer = await http.get(f"/v1/subscriptions/{started['subscription_id']}")
                    return bool(answer.json()["cancel_at_period_end"])

                await wait_for(cancel_flag, within=30, what="the event to be processed")
            assert time.monotonic() - restarted_at < 30
            assert await event_status(event_id) == "processed"
    finally:
        graphs = await db.fetch("SELECT resource_id FROM subscriptions")
        await db.close()
        admin = await asyncpg.connect(settings.database_url)
        for row in graphs:
            await admin.execute(
                f'DROP DATABASE IF EXISTS "lookout_{row["resource_id"]}" WITH (FORCE)'
            )
            await admin.execute(f'DROP ROLE IF EXISTS "lookout_{row["resource_id"]}"')
            await admin.execute(f'DROP ROLE IF EXISTS "lookout_{row["resource_id"]}_owner"')
        await admin.close()
