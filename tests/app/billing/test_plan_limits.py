"""Each number a plan advertises is enforced by PostgreSQL or labelled as measured, and what is
measured (a graph's database size) is shown to its customer and to the operator."""

from __future__ import annotations

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.settings import Settings
from tests.support.stack import Stack, running_stack

pytestmark = pytest.mark.anyio

ENFORCED = {"max_per_user", "max_connections"}


async def active(stack: Stack, plan: str, name: str) -> dict[str, object]:
    started = await stack.checkout(plan, name)
    await stack.pay(started["checkout_session_id"])
    return await stack.wait_for_status(started["subscription_id"], "active")


async def test_plans_advertise_only_enforced_limits(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        answer = await stack.anonymous.get("/v1/plans")
    assert answer.status_code == 200
    plans = {p["name"]: p for p in answer.json()["data"]}
    for plan in plans.values():
        assert {"name", "display_name", "resource_type", "price"} <= set(plan)
        assert set(plan["limits"]) == ENFORCED
        assert set(plan["soft_limits"]) <= {"storage_mb"}
        for words in ("nodes", "members"):
            assert words not in plan["description"]
    assert plans["graph-standard"]["soft_limits"] == {"storage_mb": 1024}
    reader, team = plans["repository-reader"], plans["repository-team"]
    assert team["limits"]["max_connections"] > reader["limits"]["max_connections"]


async def test_repository_plans_differ_in_what_postgresql_grants(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        reader = await active(stack, "repository-reader", "reader")
        team = await active(stack, "repository-team", "team")
        assert settings.database_url is not None
        conn = await asyncpg.connect(settings.database_url)
        try:
            limits = {
                row["rolname"]: row["rolconnlimit"]
                for row in await conn.fetch(
                    "SELECT rolname, rolconnlimit FROM pg_roles WHERE rolname = ANY($1)",
                    [f"lookout_{reader['resource_id']}", f"lookout_{team['resource_id']}"],
                )
            }
        finally:
            await conn.close()
    assert limits == {f"lookout_{reader['resource_id']}": 2, f"lookout_{team['resource_id']}": 25}


async def test_a_graphs_database_size_is_measured_for_its_customer_and_the_operator(
    settings: Settings,
) -> None:
    async with running_stack(settings) as stack:
        sub = await active(stack, "graph-standard", "measured")
        graph_id = str(sub["resource_id"])
        answer = await stack.http.get(f"/v1/graphs/{graph_id}/usage")
        assert answer.status_code == 200, answer.text
        usage = answer.json()
        scraped = await stack.anonymous.get("/metrics")

        # Another customer sees no such graph.
        _, key = await stack.new_user("someone-else@example.com")
        async with httpx.AsyncClient(
            base_url=stack.url, headers={"Authorization": f"Bearer {key}"}
        ) as other:
            assert (await other.get(f"/v1/graphs/{graph_id}/usage")).status_code == 404

        assert settings.database_url is not None
        conn = await asyncpg.connect(settings.database_url)
        try:
            size = await conn.fetchval("SELECT pg_database_size($1)", f"lookout_{graph_id}")
        finally:
            await conn.close()

    assert usage["graph_id"] == graph_id
    assert usage["limits"] == {"max_per_user": 3, "max_connections": 5}
    assert usage["soft_limits"] == {"storage_mb": 1024}
    assert usage["measured_at"].endswith("Z")
    # Measured a moment ago; a fresh database is a few MB and has barely changed since.
    assert usage["database_bytes"] > 1_000_000 and abs(usage["database_bytes"] - size) < size / 2
    samples = {
        s.labels.get("graph"): s.value
        for family in text_string_to_metric_families(scraped.text)
        for s in family.samples
        if s.name == "lookout_graph_database_bytes"
    }
    assert samples[graph_id] == usage["database_bytes"]
