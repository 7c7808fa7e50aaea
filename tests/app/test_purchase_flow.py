"""A purchase, end to end on real sockets: checkout, payment in the emulator, the signed
webhook, provisioning on the real PostgreSQL server, the subscription turning active."""

from __future__ import annotations

import asyncpg
import pytest

from app.settings import Settings
from tests.support.stack import running_stack

pytestmark = pytest.mark.anyio


async def test_a_paid_checkout_becomes_an_active_graph(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        started = await stack.checkout("graph-standard", "orders")
        assert started["status"] == "pending_payment"
        assert started["checkout_url"].startswith(stack.emulator_url)
        await stack.pay(started["checkout_session_id"])
        active = await stack.wait_for_status(started["subscription_id"], "active")
        assert active["plan_display_name"] == "Graph Standard"
        assert active["resource_type"] == "graph"
        assert active["operation_id"]
        operation = (await stack.http.get(f"/v1/operations/{active['operation_id']}")).json()
        assert operation["status"] == "completed"
        assert operation["progress"] == 100

        credentials = await stack.http.post(f"/v1/graphs/{active['resource_id']}/credentials")
        assert credentials.status_code == 200, credentials.text
        login = credentials.json()
        conn = await asyncpg.connect(login["dsn"])
        try:
            assert await conn.fetchval("SELECT current_user") == login["user"]
        finally:
            await conn.close()
