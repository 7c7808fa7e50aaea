"""Billing as real Stripe behaves (issue 13), end to end on real sockets: a plan change
resizes the graph for real and streams its `resize`; a downgrade that does not fit is refused;
`unpaid` suspends the login (a `suspend` operation) and payment restores it (`resume`);
`past_due` keeps access until its grace ends; a repository subscriber gets a login that reads
the shared repository and nothing else."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from app.billing.access import suspension_required
from app.billing.access_sweep import AccessSweep
from app.billing.plans import get_plan
from app.settings import ConfigError, Settings
from tests.app.test_provisioning_flow import read_stream
from tests.support.stack import Stack, running_stack, wait_for

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def sessions(dsn: str, count: int) -> AsyncIterator[Sequence[asyncpg.Connection]]:
    async with AsyncExitStack() as stack:
        opened = []
        for _ in range(count):
            conn = await asyncpg.connect(dsn)
            stack.push_async_callback(conn.close, timeout=2)
            opened.append(conn)
        yield opened


async def active(stack: Stack, plan: str, name: str) -> dict[str, Any]:
    started = await stack.checkout(plan, name)
    await stack.pay(started["checkout_session_id"])
    return await stack.wait_for_status(started["subscription_id"], "active")


async def reveal(stack: Stack, subscription_id: str) -> dict[str, Any]:
    answer = await stack.http.post(f"/v1/subscriptions/{subscription_id}/credentials")
    assert answer.status_code == 200, answer.text
    login: dict[str, Any] = answer.json()
    assert set(login) == {"host", "port", "database", "user", "password", "dsn"}
    return login


async def finished(stack: Stack, operation_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    """The operation's whole stream, over SSE, to its terminal event."""
    events = await read_stream(stack.http, f"/v1/operations/{operation_id}/events")
    assert events[-1][1] == "operation.completed", events[-1]
    return events


async def stripe_subscription(stack: Stack, subscription_id: str) -> dict[str, Any]:
    async with stack.app.state.services.pool.acquire() as conn:
        stripe_id = await conn.fetchval(
            "SELECT stripe_subscription_id FROM subscriptions WHERE id = $1", subscription_id
        )
    answer = await stack.emulator.get(
        f"/v1/subscriptions/{stripe_id}",
        headers={"Authorization": f"Bearer {stack.settings.stripe_api_key}"},
    )
    body: dict[str, Any] = answer.json()
    return body


async def test_an_upgrade_and_a_downgrade_resize_the_graph_live(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        sub = await active(stack, "graph-standard", "growing")
        login = await reveal(stack, sub["id"])
        with pytest.raises(asyncpg.TooManyConnectionsError):
            async with sessions(login["dsn"], 6):
                pass

        answer = await stack.http.patch(
            f"/v1/subscriptions/{sub['id']}", json={"plan": "graph-large"}
        )
        assert answer.status_code == 200, answer.text
        upgraded = answer.json()
        assert upgraded["plan"] == "graph-large"
        assert upgraded["operation_id"] != sub["operation_id"]
        events = await finished(stack, upgraded["operation_id"])
        assert events[0][1] == "operation.started"
        assert {data["kind"] for _, _, data in events} == {"resize"}
        snapshot = (await stack.http.get(f"/v1/operations/{upgraded['operation_id']}")).json()
        assert (snapshot["kind"], snapshot["status"]) == ("resize", "completed")
        # More sessions than Graph Standard's 5, with the same password.
        async with sessions(login["dsn"], 8):
            pass
        stripe = await stripe_subscription(stack, sub["id"])
        assert stripe["items"]["data"][0]["price"]["unit_amount"] == 7900
        invoices = (
            await stack.emulator.get(
                "/v1/invoices",
                params={"subscription": stripe["id"]},
                headers={"Authorization": f"Bearer {stack.settings.stripe_api_key}"},
            )
        ).json()["data"]
        assert invoices[0]["billing_reason"] == "subscription_update"
        assert invoices[0]["status"] == "paid"
        assert 0 < invoices[0]["amount_paid"] <= 7900 - 2900

        # Eight open: Graph Standard's 5 would not fit them.
        async with sessions(login["dsn"], 8):
            refused = await stack.http.patch(
                f"/v1/subscriptions/{sub['id']}", json={"plan": "graph-standard"}
            )
        assert refused.status_code == 409, refused.text
        error = refused.json()["error"]
        assert error["code"] == "downgrade_does_not_fit"
        assert "8 connections open" in error["message"] and "allows 5" in error["message"]
        assert (await stack.subscription(sub["id"]))["plan"] == "graph-large"

        answer = await stack.http.patch(
            f"/v1/subscriptions/{sub['id']}", json={"plan": "graph-standard"}
        )
        assert answer.status_code == 200, answer.text
        downgraded = answer.json()
        await finished(stack, downgraded["operation_id"])
        async with sessions(login["dsn"], 5):
            pass
        with pytest.raises(asyncpg.TooManyConnectionsError):
            async with sessions(login["dsn"], 6):
                pass


async def test_a_plan_change_refuses_unknown_plans_and_other_resource_types(
    settings: Settings,
) -> None:
    async with running_stack(settings) as stack:
        sub = await active(stack, "graph-standard", "fixed")
        for plan, code in (
            ("graph-huge", "unknown_plan"),
            ("repository-team", "wrong_resource_type"),
        ):
            answer = await stack.http.patch(f"/v1/subscriptions/{sub['id']}", json={"plan": plan})
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"]["code"] == code
        pending = await stack.checkout("graph-large", "unpaid-yet")
        answer = await stack.http.patch(
            f"/v1/subscriptions/{pending['subscription_id']}", json={"plan": "graph-standard"}
        )
        assert answer.status_code == 409
        assert answer.json()["error"]["code"] == "not_changeable"


async def test_unpaid_suspends_the_graph_and_payment_restores_it(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        sub = await active(stack, "graph-standard", "dunning")
        login = await reveal(stack, sub["id"])
        stripe_id = (await stripe_subscription(stack, sub["id"]))["id"]
        renewed = await stack.emulator.post(
            f"/_emulator/subscriptions/{stripe_id}/renew", json={"outcome": "failed"}
        )
        assert renewed.status_code == 200, renewed.text
        past_due = await stack.wait_for_status(sub["id"], "past_due")
        assert past_due["operation_id"] == sub["operation_id"]  # still in its grace period
        open_session = await asyncpg.connect(login["dsn"])
        try:
            assert await open_session.fetchval("SELECT 1") == 1
            moved = await stack.emulator.post(
                f"/_emulator/subscriptions/{stripe_id}/status", json={"status": "unpaid"}
            )
            assert moved.status_code == 200, moved.text
            unpaid = await stack.wait_for_status(sub["id"], "unpaid")

            async def suspension() -> str | None:
                found = await stack.subscription(sub["id"])
                return (
                    found["operation_id"] if found["operation_id"] != sub["operation_id"] else None
                )

            suspend_id = await wait_for(suspension, what="the suspend operation")
            assert unpaid["status"] == "unpaid"
            events = await finished(stack, suspend_id)
            assert {data["kind"] for _, _, data in events} == {"suspend"}
            with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError)):
                await open_session.fetchval("SELECT 1")
        finally:
            with contextlib.suppress(Exception):
                await open_session.close(timeout=2)
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
            await asyncpg.connect(login["dsn"])
        refused = await stack.http.post(f"/v1/subscriptions/{sub['id']}/credentials")
        assert refused.status_code == 409

        paid = await stack.emulator.post(f"/_emulator/subscriptions/{stripe_id}/pay_invoice")
        assert paid.status_code == 200, paid.text
        await stack.wait_for_status(sub["id"], "active")

        async def resumption() -> str | None:
            found = await stack.subscription(sub["id"])
            return found["operation_id"] if found["operation_id"] != suspend_id else None

        resume_id = await wait_for(resumption, what="the resume operation")
        events = await finished(stack, resume_id)
        assert {data["kind"] for _, _, data in events} == {"resume"}
        conn = await asyncpg.connect(login["dsn"])
        await conn.close()


async def test_past_due_keeps_access_until_the_grace_period_ends(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        sub = await active(stack, "graph-standard", "late")
        login = await reveal(stack, sub["id"])
        stripe_id = (await stripe_subscription(stack, sub["id"]))["id"]
        await stack.emulator.post(
            f"/_emulator/subscriptions/{stripe_id}/renew", json={"outcome": "failed"}
        )
        await stack.wait_for_status(sub["id"], "past_due")
        # Events delivered late would decide again with the configured grace (7 days) and
        # undo the suspension the shortened grace below makes: let them all arrive first.
        await stack.settled()
        services = stack.app.state.services
        sweep = AccessSweep(services.pool, services.lifecycle)
        assert await sweep.sweep_once() == []  # the configured 7 days have not passed
        assert await sweep.sweep_once(grace=timedelta(days=1)) == []
        conn = await asyncpg.connect(login["dsn"])
        await conn.close()

        (suspend_id,) = await sweep.sweep_once(grace=timedelta(0))
        events = await finished(stack, suspend_id)
        assert {data["kind"] for _, _, data in events} == {"suspend"}
        assert (await stack.subscription(sub["id"]))["operation_id"] == suspend_id
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
            await asyncpg.connect(login["dsn"])
        assert await sweep.sweep_once(grace=timedelta(0)) == []  # once


async def test_a_repository_subscriber_reads_the_shared_repository_and_nothing_else(
    settings: Settings,
) -> None:
    async with running_stack(settings) as stack:
        pending = await stack.checkout("repository-reader", "reading")
        early = await stack.http.post(f"/v1/subscriptions/{pending['subscription_id']}/credentials")
        assert early.status_code == 409
        assert early.json()["error"]["code"] == "not_active"
        await stack.pay(pending["checkout_session_id"])
        sub = await stack.wait_for_status(pending["subscription_id"], "active")
        login = await reveal(stack, sub["id"])
        assert login["database"] == "lookout_shared"
        conn = await asyncpg.connect(login["dsn"])
        try:
            assert await conn.fetchval("SELECT count(*) FROM repository.countries") == 5
            await conn.execute("SET default_transaction_read_only = off")
            for statement in (
                "INSERT INTO repository.countries VALUES ('XX', 'X', 'Y', 1)",
                "DELETE FROM repository.cities",
                "CREATE TABLE public.mine (x int)",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(statement)
        finally:
            await conn.close()
        own = await stack.app.state.services.pool.fetchval("SELECT current_database()")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await asyncpg.connect(login["dsn"].replace("/lookout_shared", f"/{own}"))


async def test_a_plan_changed_in_stripe_itself_is_followed_with_a_resize(
    settings: Settings,
) -> None:
    """As a switch in the Customer Portal: Stripe's webhook says the price changed."""
    async with running_stack(settings) as stack:
        sub = await active(stack, "graph-standard", "portal")
        login = await reveal(stack, sub["id"])
        stripe_id = (await stripe_subscription(stack, sub["id"]))["id"]
        provider = stack.app.state.services.provider
        await provider.change_price(
            stripe_id, get_plan("graph-large"), upgrade=True, idempotency_key="portal-switch"
        )

        async def followed() -> dict[str, Any] | None:
            found = await stack.subscription(sub["id"])
            return found if found["plan"] == "graph-large" else None

        after = await wait_for(followed, what="the plan to follow Stripe's price")
        assert after["operation_id"] != sub["operation_id"]
        events = await finished(stack, after["operation_id"])
        assert {data["kind"] for _, _, data in events} == {"resize"}
        async with sessions(login["dsn"], 8):
            pass
        async with stack.app.state.services.pool.acquire() as conn:
            resizes = await conn.fetchval(
                "SELECT count(*) FROM operations WHERE subject_id = $1 AND kind = 'resize'",
                sub["id"],
            )
        assert resizes == 1  # the webhook and the fetch that follows it agree: one resize


async def test_a_paused_repository_subscription_loses_its_grants_until_it_resumes(
    settings: Settings,
) -> None:
    async with running_stack(settings) as stack:
        sub = await active(stack, "repository-reader", "pausing")
        login = await reveal(stack, sub["id"])
        stripe_id = (await stripe_subscription(stack, sub["id"]))["id"]
        for status, kind in (("paused", "suspend"), ("active", "resume")):
            await stack.settled()  # no late event of the step before is taken for this one
            before = (await stack.subscription(sub["id"]))["operation_id"]
            moved = await stack.emulator.post(
                f"/_emulator/subscriptions/{stripe_id}/status", json={"status": status}
            )
            assert moved.status_code == 200, moved.text
            assert any(
                e["type"].startswith("customer.subscription.") for e in moved.json()["events"]
            )

            async def changed(before: str = before) -> str | None:
                found = await stack.subscription(sub["id"])
                return found["operation_id"] if found["operation_id"] != before else None

            events = await finished(stack, await wait_for(changed, what=f"the {kind}"))
            assert {data["kind"] for _, _, data in events} == {kind}
            if kind == "suspend":
                with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
                    await asyncpg.connect(login["dsn"])
                async with stack.app.state.services.pool.acquire() as conn:
                    reads = await conn.fetchval(
                        "SELECT has_database_privilege($1, 'lookout_shared', 'CONNECT')",
                        login["user"],
                    )
                assert reads is False
        conn = await asyncpg.connect(login["dsn"])
        try:
            assert await conn.fetchval("SELECT count(*) FROM repository.cities") == 8
        finally:
            await conn.close()
        assert (await stack.subscription(sub["id"]))["status"] == "active"


def test_the_grace_period_is_a_setting_and_the_rule_uses_it() -> None:
    base = {
        "LOOKOUT_SECRET_KEY": "k" * 32,
        "STRIPE_API_KEY": "sk_x",
        "STRIPE_WEBHOOK_SECRET": "whsec_x",
    }
    assert Settings.from_env(base).past_due_grace_days == 7
    assert Settings.from_env({**base, "LOOKOUT_PAST_DUE_GRACE_DAYS": "0"}).past_due_grace_days == 0
    with pytest.raises(ConfigError, match="LOOKOUT_PAST_DUE_GRACE_DAYS"):
        Settings.from_env({**base, "LOOKOUT_PAST_DUE_GRACE_DAYS": "a week"})
    now = datetime.now(UTC)
    week = timedelta(days=7)
    assert not suspension_required("past_due", now - timedelta(days=6), now=now, grace=week)
    assert suspension_required("past_due", now - week, now=now, grace=week)
    assert suspension_required("unpaid", None, now=now, grace=week)
    assert suspension_required("paused", None, now=now, grace=week)
    assert not suspension_required("active", None, now=now, grace=week)
