"""Two real `lookout serve` processes: work left by one that is killed (SIGKILL) or stalled
(SIGSTOP, then SIGCONT) is finished by the other, at once for a dead one, and never undone or
redone by the stalled one when it wakes up."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import anyio
import asyncpg
import httpx
import pytest

from app.settings import Settings
from app.users import create_api_key, create_user
from bench.chaos.proxy import FaultProxy, fault_proxy, url_through
from provisioning.pgadmin import quote_ident
from tests.support.process import ServeProcess, process_stripe, serve_process
from tests.support.stack import wait_for

pytestmark = pytest.mark.anyio


@dataclass
class Setup:
    settings: Settings
    first_settings: Settings  # the first instance's: its provisioning server through the proxy
    port: int  # the first instance's, where the emulator's webhooks go
    db: asyncpg.Connection
    control: httpx.AsyncClient
    proxy: FaultProxy
    auth: dict[str, str]

    async def operation(self, subscription_id: str) -> asyncpg.Record | None:
        row: asyncpg.Record | None = await self.db.fetchrow(
            "SELECT * FROM operations WHERE subject_id = $1 AND kind = 'provision'",
            subscription_id,
        )
        return row


@contextlib.asynccontextmanager
async def two_instances_setup(settings: Settings, pg_admin_dsn: str) -> AsyncIterator[Setup]:
    """The Stripe emulator (its webhooks go to the first instance's port) and a proxy in front
    of the provisioning server for the first instance."""
    assert settings.database_url is not None
    db = await asyncpg.connect(settings.database_url)
    user = await create_user(db, f"takeover-{secrets.token_hex(3)}@example.com")
    key = await create_api_key(db, user.id)
    try:
        async with (
            process_stripe(settings) as stripe,
            fault_proxy("provisioner", pg_admin_dsn) as proxy,
        ):
            direct = replace(stripe.settings, provisioner_database_urls=(pg_admin_dsn,))
            through_proxy = replace(
                direct, provisioner_database_urls=(url_through(pg_admin_dsn, proxy.port),)
            )
            auth = {"Authorization": f"Bearer {key}"}
            yield Setup(direct, through_proxy, stripe.port, db, stripe.control, proxy, auth)
    finally:
        resources = await db.fetch("SELECT resource_id FROM subscriptions")
        await db.close()
        admin = await asyncpg.connect(pg_admin_dsn)
        try:
            for row in resources:
                name = quote_ident(f"lookout_{row['resource_id']}")
                await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                await admin.execute(f"DROP ROLE IF EXISTS {name}")
        finally:
            await admin.close()


class Instances(NamedTuple):
    first: ServeProcess  # on the webhooks' port, its provisioning server through the proxy
    http: httpx.AsyncClient  # the customer's, to the first
    other: httpx.AsyncClient  # the customer's, to the second


@contextlib.asynccontextmanager
async def two_instances(setup: Setup) -> AsyncIterator[Instances]:
    async with (
        serve_process(setup.first_settings, port=setup.port) as first,
        httpx.AsyncClient(base_url=first.url, headers=setup.auth) as http,
        serve_process(setup.settings) as second,
        httpx.AsyncClient(base_url=second.url, headers=setup.auth) as other,
    ):
        yield Instances(first, http, other)


async def create_database_under_way(setup: Setup, subscription_id: str) -> asyncpg.Record:
    """The provision, once its create_database step has reached the (stalled) proxy."""

    async def in_create_database() -> asyncpg.Record | None:
        op = await setup.operation(subscription_id)
        held = op is not None and op["step"] == "create_database"
        return op if held and setup.proxy.connections > 0 else None

    op: asyncpg.Record = await wait_for(in_create_database, what="create_database to be under way")
    return op


async def wait_active(other: httpx.AsyncClient, subscription_id: str) -> None:
    async def active() -> bool:
        answer = await other.get(f"/v1/subscriptions/{subscription_id}")
        return bool(answer.json()["status"] == "active")

    await wait_for(active, within=60, what="the subscription to be active")


async def pay_for_a_graph(setup: Setup, http: httpx.AsyncClient) -> str:
    answer = await http.post(
        "/v1/checkout", json={"plan": "graph-standard", "resource_name": "takeover"}
    )
    assert answer.status_code == 201, answer.text
    started = answer.json()
    paid = await setup.control.post(f"/_emulator/checkout/{started['checkout_session_id']}/pay")
    assert paid.status_code == 200, paid.text
    subscription_id: str = started["subscription_id"]
    return subscription_id


async def server_objects(pg_admin_dsn: str, resource_id: str) -> tuple[int, int]:
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        name = f"lookout_{resource_id}"
        dbs = await admin.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name)
        roles = await admin.fetchval("SELECT count(*) FROM pg_roles WHERE rolname = $1", name)
    finally:
        await admin.close()
    return int(dbs), int(roles)


async def step_events(http: httpx.AsyncClient, op_id: str) -> list[dict[str, Any]]:
    """The operation's events, from its SSE stream (it closes after the terminal event)."""
    events: list[dict[str, Any]] = []
    async with http.stream("GET", f"/v1/operations/{op_id}/events", timeout=30) as answer:
        assert answer.status_code == 200
        async for line in answer.aiter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events


@pytest.mark.timeout(180)
async def test_a_killed_instance_s_provision_is_taken_over_within_5_s_and_runs_each_step_once(
    settings: Settings, pg_admin_dsn: str
) -> None:
    async with two_instances_setup(settings, pg_admin_dsn) as setup:
        # The first instance reaches its provisioning server through the proxy, which holds
        # its connections: it is killed in the middle of create_database.
        setup.proxy.stall()
        async with two_instances(setup) as (first, http, other):
            subscription_id = await pay_for_a_graph(setup, http)
            op = await create_database_under_way(setup, subscription_id)
            owner = op["lease_owner"]
            first.kill()
            died = time.monotonic()

            async def taken_over() -> asyncpg.Record | None:
                now = await setup.operation(subscription_id)
                return now if now is not None and now["lease_owner"] != owner else None

            taken = await wait_for(taken_over, within=60, what="another instance to take over")
            takeover = time.monotonic() - died
            print(f"\nMEASURED takeover after SIGKILL: {takeover:.2f} s")
            await wait_active(other, subscription_id)
            events = await step_events(other, op["id"])

        done = await setup.operation(subscription_id)
        assert done is not None
        assert takeover < 5
        assert taken["attempts"] == 2
        assert done["status"] == "completed" and done["attempts"] == 2
        assert len(done["completed_steps"]) == len(set(done["completed_steps"]))
        assert await server_objects(pg_admin_dsn, done["resource_id"]) == (1, 1)
        begun = [e["step"] for e in events if e["type"] == "operation.progress"]
        # create_database began on the killed instance (its connection never got past the
        # proxy) and again on the other; every other step ran once.
        assert begun.count("create_database") == 2
        assert all(begun.count(step) == 1 for step in set(begun) - {"create_database"})
        assert [e["type"] for e in events].count("operation.completed") == 1


async def can_log_in(pg_admin_dsn: str, resource_id: str) -> bool:
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        role = f"lookout_{resource_id}"
        return bool(
            await admin.fetchval("SELECT rolcanlogin FROM pg_roles WHERE rolname = $1", role)
        )
    finally:
        await admin.close()


@pytest.mark.timeout(180)
async def test_a_stopped_instance_woken_after_a_takeover_undoes_and_redoes_nothing(
    settings: Settings, pg_admin_dsn: str
) -> None:
    async with two_instances_setup(settings, pg_admin_dsn) as setup:
        # The first instance's provisioning server does not answer: its provision waits, and
        # the process is stopped while it waits (between two tries, outside any step).
        await setup.proxy.refuse()
        async with two_instances(setup) as (first, http, other):
            subscription_id = await pay_for_a_graph(setup, http)

            async def waiting() -> asyncpg.Record | None:
                # Not yet `pending` either: an operation is created before it runs, and with
                # the webhooks out of order the test may look in between.
                op = await setup.operation(subscription_id)
                return op if op is not None and op["status"] not in ("pending", "running") else None

            op = await wait_for(waiting, within=60, what="the provision to wait")
            assert op["status"] == "waiting"
            owner = op["lease_owner"]
            os.kill(first.process.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            try:

                async def completed_elsewhere() -> asyncpg.Record | None:
                    now = await setup.operation(subscription_id)
                    if now is None or now["finalized_at"] is None:
                        return None
                    return now if now["lease_owner"] != owner else None

                done = await wait_for(
                    completed_elsewhere, within=90, what="the other instance to finish it"
                )
                print(f"\nMEASURED takeover after SIGSTOP: {time.monotonic() - stopped:.2f} s")
                assert done["status"] == "completed"
                assert await server_objects(pg_admin_dsn, done["resource_id"]) == (1, 1)
                # Its provisioning server answers again: nothing would stop it but its lease.
                await setup.proxy.accept()
            finally:
                os.kill(first.process.pid, signal.SIGCONT)
            # Time for it to wake up, to try again and to do whatever comes next.
            await anyio.sleep(8)
            after = await setup.operation(subscription_id)
            assert (await http.get("/readyz")).status_code == 200
            events = await step_events(other, op["id"])

        assert after is not None and dict(after) == dict(done)
        assert await server_objects(pg_admin_dsn, done["resource_id"]) == (1, 1)
        assert await can_log_in(pg_admin_dsn, done["resource_id"])
        types = [e["type"] for e in events]
        assert types.count("operation.completed") == 1 and types[-1] == "operation.completed"
        assert setup.proxy.connections == 0  # it never reached its server again


@pytest.mark.timeout(180)
async def test_no_instance_takes_over_a_step_that_a_stopped_instance_has_under_way(
    settings: Settings, pg_admin_dsn: str
) -> None:
    async with two_instances_setup(settings, pg_admin_dsn) as setup:
        setup.proxy.stall()
        async with two_instances(setup) as (first, http, other):
            subscription_id = await pay_for_a_graph(setup, http)
            op = await create_database_under_way(setup, subscription_id)
            owner = op["lease_owner"]
            os.kill(first.process.pid, signal.SIGSTOP)
            try:
                # Well past its lease (15 s): its step may still send statements, so the
                # other instance must leave the operation alone.
                await anyio.sleep(20)
                during = await setup.operation(subscription_id)
                assert during is not None and during["lease_owner"] == owner
                assert during["attempts"] == 1
                setup.proxy.unstall()
            finally:
                os.kill(first.process.pid, signal.SIGCONT)
            await wait_active(other, subscription_id)
            events = await step_events(other, op["id"])

        done = await setup.operation(subscription_id)
        assert done is not None and done["status"] == "completed"
        assert await server_objects(pg_admin_dsn, done["resource_id"]) == (1, 1)
        assert await can_log_in(pg_admin_dsn, done["resource_id"])
        types = [e["type"] for e in events]
        assert types.count("operation.completed") == 1 and types[-1] == "operation.completed"
