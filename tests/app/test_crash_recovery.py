"""A process killed with SIGKILL loses nothing it acknowledged."""

from __future__ import annotations

import secrets
import time
from dataclasses import replace

import asyncpg
import httpx
import pytest

from app.settings import Settings
from app.stripe_emulator import create_emulator
from app.users import create_api_key, create_user
from tests.support import free_port, live_server
from tests.support.process import serve_process
from tests.support.stack import wait_for
from tests.support.stripe_events import deliver

pytestmark = pytest.mark.anyio


@pytest.mark.timeout(120)
async def test_an_event_acknowledged_by_a_killed_process_is_processed_after_restart(
    settings: Settings,
) -> None:
    port, emulator_port = free_port(), free_port()
    url, emulator_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{emulator_port}"
    secret = f"whsec_{secrets.token_hex(8)}"
    settings = replace(settings, stripe_api_base=emulator_url, stripe_webhook_secrets=(secret,))
    emulator = create_emulator(
        webhook_url=f"{url}/v1/webhooks/stripe",
        webhook_secret=secret,
        public_url=emulator_url,
        api_key=settings.stripe_api_key,
        webhook_retry_base=0.2,
    )
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
        async with (
            live_server(emulator, port=emulator_port),
            httpx.AsyncClient(base_url=emulator_url) as control,
        ):
            auth = {"Authorization": f"Bearer {key}"}
            async with (
                serve_process(settings, port=port) as first,
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
                serve_process(settings, port=port) as second,
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
