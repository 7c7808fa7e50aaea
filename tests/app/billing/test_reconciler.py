"""The reconciler makes each subscription's resource what its status requires, on real servers."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import replace

import anyio
import asyncpg
import pytest

from app.billing.fulfilment import resource_spec
from app.billing.reconciler import Reconciler, Repair
from app.billing.subscriptions import get_subscription
from app.settings import Settings
from provisioning import (
    GraphBackend,
    OperationRecord,
    OperationRunner,
    SharedRepositoryBackend,
    Step,
    StepContext,
)
from tests.provisioning.support import HoldingBackend, drop_server_objects
from tests.support.stack import Stack, running_stack, wait_for

pytestmark = pytest.mark.anyio


class GateBefore(HoldingBackend):
    """Wraps a real backend: the step ``hold_at`` waits on ``release`` before it runs."""

    def _wrap(self, step: Step) -> Step:
        async def run(ctx: StepContext) -> None:
            self.holding.set()
            await self.release.wait()
            await step.run(ctx)

        return replace(step, run=run)


@pytest.fixture
async def graphs(settings: Settings) -> AsyncIterator[GraphBackend]:
    """Graphs named for this test only; whatever is left of them is dropped after it."""
    assert settings.database_url is not None
    prefix = f"lkr{secrets.token_hex(4)}_"
    yield GraphBackend(settings.database_url, name_prefix=prefix)
    await drop_server_objects(settings.database_url, prefix)


async def on_server(stack: Stack, graphs: GraphBackend, resource_id: str) -> tuple[bool, bool]:
    """Whether the graph's database and its login role exist on the provisioning server."""
    assert stack.settings.database_url is not None
    conn = await asyncpg.connect(stack.settings.database_url)
    try:
        db = await conn.fetchval(
            "SELECT true FROM pg_database WHERE datname = $1", graphs.database_name(resource_id)
        )
        role = await conn.fetchval(
            "SELECT true FROM pg_roles WHERE rolname = $1", graphs.role_name(resource_id)
        )
    finally:
        await conn.close()
    return bool(db), bool(role)


async def active_graph(stack: Stack, name: str) -> dict[str, str]:
    started = await stack.checkout("graph-standard", name)
    await stack.pay(started["checkout_session_id"])
    active = await stack.wait_for_status(started["subscription_id"], "active")
    return {"subscription_id": active["id"], "resource_id": active["resource_id"]}


def reconciler(stack: Stack) -> Reconciler:
    """What every instance runs, looking also at subscriptions changed a moment ago."""
    services = stack.app.state.services
    return Reconciler(services.pool, services.lifecycle, settle_seconds=0)


async def operations(stack: Stack, subscription_id: str) -> list[OperationRecord]:
    async with stack.app.state.services.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT * FROM operations WHERE subject_id = $1 ORDER BY created_at", subscription_id
        )
    return [OperationRecord.from_row(r) for r in rows]


async def all_finished(stack: Stack, subscription_id: str) -> list[OperationRecord] | None:
    ops = await operations(stack, subscription_id)
    return ops if all(op.finalized_at is not None for op in ops) else None


async def resource_status(stack: Stack, resource_id: str) -> str:
    async with stack.app.state.services.pool.acquire() as conn:
        status: str = await conn.fetchval("SELECT status FROM resources WHERE id = $1", resource_id)
    return status


async def test_a_cancellation_whose_deprovision_never_started_is_removed(
    settings: Settings, graphs: GraphBackend
) -> None:
    repos = SharedRepositoryBackend(settings.database_url or "")
    async with running_stack(settings, backends=[graphs, repos]) as stack:
        graph = await active_graph(stack, "left-behind")
        assert await on_server(stack, graphs, graph["resource_id"]) == (True, True)
        # What a crash between the commit of `canceled` and `runner.start` leaves: the status
        # committed, no deprovision. A redelivered event would see `canceled` and do nothing.
        async with stack.app.state.services.pool.acquire() as conn:
            await conn.execute(
                "UPDATE subscriptions SET status = 'canceled' WHERE id = $1",
                graph["subscription_id"],
            )

        repairs = await reconciler(stack).reconcile_once()

        started = [r for r in repairs if r.subscription_id == graph["subscription_id"]]
        assert [r.action for r in started] == ["deprovision"]
        await wait_for(
            lambda: all_finished(stack, graph["subscription_id"]), what="the deprovision"
        )
        assert await on_server(stack, graphs, graph["resource_id"]) == (False, False)
        assert await resource_status(stack, graph["resource_id"]) == "deleted"
        kinds = [(op.kind, op.status) for op in await operations(stack, graph["subscription_id"])]
        assert kinds == [("provision", "completed"), ("deprovision", "completed")]
        # Converged: the next sweep has nothing to do.
        assert await reconciler(stack).reconcile_once() == []


async def test_a_provision_that_completes_after_its_cancellation_is_removed(
    settings: Settings, graphs: GraphBackend
) -> None:
    """The provision runs on one instance, the cancellation arrives at another: its
    deprovision finds nothing yet and completes, then the provision creates the graph."""
    gate = GateBefore(graphs, hold_at="create_database")
    repos = SharedRepositoryBackend(settings.database_url or "")
    async with running_stack(settings, backends=[graphs, repos]) as stack:
        services = stack.app.state.services
        started = await stack.checkout("graph-standard", "late-one")
        await stack.pay(started["checkout_session_id"], deliver_webhooks=False)
        subscription_id = started["subscription_id"]
        async with services.pool.acquire() as conn:
            record = await get_subscription(conn, subscription_id)
        assert record is not None
        # The other instance: its own pool, a long lease (it notices a cancellation only at a
        # renewal, which does not come during this test).
        assert settings.database_url is not None
        pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=5)
        other = OperationRunner(
            pool,
            services.publisher,
            services.hooks,
            [gate, repos],
            instance_id=f"other-{secrets.token_hex(3)}",
            lease_seconds=90,
        )
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(other.run)
                provision = await other.start(
                    "provision",
                    record.id,
                    record.user_id,
                    resource_spec(record),
                    resource_id=record.resource_id,
                )
                async with services.pool.acquire() as conn:
                    await conn.execute(
                        "UPDATE subscriptions SET status = 'provisioning', operation_id = $2"
                        " WHERE id = $1",
                        subscription_id,
                        provision.id,
                    )
                with anyio.fail_after(30):
                    await gate.holding.wait()

                # The customer cancels: the webhook path of this instance.
                canceled = await services.lifecycle.set_status(
                    subscription_id,
                    "canceled",
                    only_from=frozenset({"provisioning"}),
                    reason="customer.subscription.deleted",
                )
                assert canceled is not None and canceled.status == "canceled"
                await services.lifecycle.schedule_deprovisioning(canceled)

                async def deprovisioned() -> bool:
                    return any(
                        op.kind == "deprovision" and op.status == "completed"
                        for op in await operations(stack, subscription_id)
                    )

                await wait_for(deprovisioned, what="the first deprovision")
                gate.release.set()

                async def provision_ended() -> bool:
                    ops = await operations(stack, subscription_id)
                    return any(op.kind == "provision" and op.finalized_at for op in ops)

                await wait_for(provision_ended, what="the late provision to end")
                repairs = await reconciler(stack).reconcile_once()
                await wait_for(lambda: all_finished(stack, subscription_id), what="every operation")
                tg.cancel_scope.cancel()
        finally:
            await pool.close()

        ops = await operations(stack, subscription_id)
        if ops[0].status == "completed":
            # The race as it happened on f68d3ea: the graph came back after its deprovision,
            # and a second deprovision (the next generation) removed it.
            assert [r.action for r in repairs] == ["deprovision"]
            assert [(o.kind, o.generation, o.status) for o in ops] == [
                ("provision", 0, "completed"),
                ("deprovision", 0, "completed"),
                ("deprovision", 1, "completed"),
            ]
        assert await on_server(stack, graphs, record.resource_id) == (False, False)
        assert await resource_status(stack, record.resource_id) == "deleted"
        assert (await stack.subscription(subscription_id))["status"] == "canceled"


async def test_a_paid_subscription_whose_provision_never_started_is_provisioned(
    settings: Settings, graphs: GraphBackend
) -> None:
    repos = SharedRepositoryBackend(settings.database_url or "")
    async with running_stack(settings, backends=[graphs, repos]) as stack:
        started = await stack.checkout("graph-standard", "never-started")
        await stack.pay(started["checkout_session_id"], deliver_webhooks=False)
        # A crash between `fulfil`'s commit of `provisioning` and `runner.start`.
        async with stack.app.state.services.pool.acquire() as conn:
            await conn.execute(
                "UPDATE subscriptions SET status = 'provisioning' WHERE id = $1",
                started["subscription_id"],
            )

        repairs = await reconciler(stack).reconcile_once()

        assert [r.action for r in repairs] == ["provision"]
        active = await stack.wait_for_status(started["subscription_id"], "active")
        assert active["operation_id"] == repairs[0].operation_id
        assert await on_server(stack, graphs, active["resource_id"]) == (True, True)


async def test_an_active_subscription_whose_resource_is_gone_is_reported_once(
    settings: Settings, graphs: GraphBackend
) -> None:
    repos = SharedRepositoryBackend(settings.database_url or "")
    async with running_stack(settings, backends=[graphs, repos]) as stack:
        graph = await active_graph(stack, "removed-by-hand")
        # An operator removes it by hand, outside Lookout's paths.
        await graphs.teardown(graph["resource_id"])
        async with stack.app.state.services.pool.acquire() as conn:
            await conn.execute(
                "UPDATE resources SET status = 'deleted', deleted_at = now() WHERE id = $1",
                graph["resource_id"],
            )

        first = await reconciler(stack).reconcile_once()
        again = await reconciler(stack).reconcile_once()

        assert first == [Repair(graph["subscription_id"], "reported")]
        assert again == []
        async with stack.app.state.services.pool.acquire() as conn:
            reports = await conn.fetchval(
                "SELECT count(*) FROM audit_log"
                " WHERE subject_id = $1 AND kind = 'subscription.resource_missing'",
                graph["subscription_id"],
            )
        assert reports == 1
        # Reported, not silently replaced by an empty database.
        assert await on_server(stack, graphs, graph["resource_id"]) == (False, False)
        assert [op.kind for op in await operations(stack, graph["subscription_id"])] == [
            "provision"
        ]
