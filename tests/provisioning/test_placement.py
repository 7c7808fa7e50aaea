"""Graphs over two real PostgreSQL servers (the test server and a second, embedded one): a new
graph goes to the open server with the most room, a server that does not answer gets none and
delays nothing, a graph pinned to it waits for it, and everything later (credentials,
deprovision) goes to the graph's own server."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit

import anyio
import asyncpg
import pytest
from redis.asyncio import Redis

from bench.chaos.proxy import fault_proxy, url_through
from provisioning import GraphBackend, PlacedGraphBackend, ResourceSpec, RetryPolicy
from provisioning.placement import PLACEMENT_LOCK_ID
from provisioning.reaper import OrphanReaper
from provisioning.resources import get_resource
from provisioning.servers import ProvisioningServer, set_drained
from streams import EventPublisher
from tests.provisioning.support import (
    HoldingBackend,
    RecordingHooks,
    Serving,
    new_subject,
    operation_events,
    running,
    server_objects,
    wait_for,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

GRAPH = ResourceSpec("graph", "graph_standard", {"max_connections": 5})
# Waits of a few tenths of a second: the outages below last seconds, not minutes.
QUICK = RetryPolicy(attempts=2, initial_delay=0.02, max_delay=0.05, outage_max_delay=0.3)


def server(dsn: str, *, weight: int) -> ProvisioningServer:
    parts = urlsplit(dsn)
    query = [*parse_qsl(parts.query), ("lookout_weight", str(weight))]
    return ProvisioningServer.parse(parts._replace(query=urlencode(query)).geturl())


def placed_over(
    pool: asyncpg.Pool, servers: Sequence[ProvisioningServer], name_prefix: str
) -> PlacedGraphBackend:
    return PlacedGraphBackend(
        pool,
        [(s, GraphBackend(s.dsn, name_prefix=name_prefix, connect_timeout=2)) for s in servers],
        probe_timeout=2,
    )


async def recorded(pool: asyncpg.Pool, resource_ids: Sequence[str]) -> list[str]:
    found = []
    async with pool.acquire() as conn:
        for resource_id in resource_ids:
            resource = await get_resource(conn, resource_id)
            assert resource is not None and resource.placed
            found.append(resource.server or "(none)")
    return found


async def fill(pool: asyncpg.Pool, user_id: str, name: str, graphs: int) -> None:
    """Rows of graphs held on ``name`` (what placement counts), made by an earlier provision."""
    for _ in range(graphs):
        await pool.execute(
            "INSERT INTO resources (id, resource_type, user_id, subject_id, plan, status,"
            " server, placed) VALUES ($1, 'graph', $2, $3, 'other', 'active', $4, true)",
            f"gr_{secrets.token_hex(12)}",
            user_id,
            new_subject(),
            name,
        )


async def port_of(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SHOW port"))
    finally:
        await conn.close()


async def test_a_full_server_gets_no_new_graph_and_each_graph_is_reached_on_its_own(
    db_pool: asyncpg.Pool,
    serving: Serving,
    user_id: str,
    second_prefix: str,
    pg_admin_dsn: str,
    second_pg_dsn: str,
) -> None:
    first, second = server(pg_admin_dsn, weight=2), server(second_pg_dsn, weight=2)
    placed = placed_over(db_pool, [first, second], second_prefix)
    await fill(db_pool, user_id, first.name, 2)  # the first server holds its weight
    async with serving([placed], max_concurrent=4) as runner:
        ops = [await runner.start("provision", new_subject(), user_id, GRAPH) for _ in range(2)]
        done = [await wait_for(db_pool, op.id) for op in ops]
        assert [op.status for op in done] == ["completed", "completed"]
        graphs = [op.resource_id for op in ops]
        assert await recorded(db_pool, graphs) == [second.name, second.name]
        names = sorted(second_prefix + graph for graph in graphs)
        assert sorted((await server_objects(second_pg_dsn, second_prefix))[0]) == names
        assert await server_objects(pg_admin_dsn, second_prefix) == ([], [])
        async with db_pool.acquire() as conn:
            states = {s.name: (s.graphs, s.weight) for s in await placed.states(conn)}
        assert states == {first.name: (2, 2), second.name: (2, 2)}

        # The credentials name the second server, and open the graph there only.
        credentials = await runner.rotate_credentials(graphs[0])
        assert credentials.port == await port_of(second_pg_dsn) != await port_of(pg_admin_dsn)
        own = await asyncpg.connect(credentials.dsn)
        try:
            assert await own.fetchval("SELECT current_database()") == credentials.database
            assert int(await own.fetchval("SHOW port")) == credentials.port
        finally:
            await own.close()
        first_parts = urlsplit(pg_admin_dsn)
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
            await asyncpg.connect(
                host=first_parts.hostname,
                port=first_parts.port,
                user=credentials.user,
                password=credentials.password,
                database=credentials.database,
            )

        # A deprovision drops the graph on its own server.
        gone = await runner.start(
            "deprovision", ops[0].subject_id, user_id, GRAPH, resource_id=graphs[0]
        )
        assert (await wait_for(db_pool, gone.id)).status == "completed"
    assert (await server_objects(second_pg_dsn, second_prefix))[0] == [second_prefix + graphs[1]]


async def test_a_server_lost_mid_burst_delays_only_the_graphs_already_on_it(
    db_pool: asyncpg.Pool,
    serving: Serving,
    hooks: RecordingHooks,
    user_id: str,
    second_prefix: str,
    pg_admin_dsn: str,
    second_pg_dsn: str,
) -> None:
    async with fault_proxy("second", second_pg_dsn) as proxy:
        # The second server has the most room: the burst starts there.
        first = server(pg_admin_dsn, weight=1)
        second = server(url_through(second_pg_dsn, proxy.port), weight=10)
        placed = placed_over(db_pool, [first, second], second_prefix)
        holding = HoldingBackend(placed, hold_at="create_role")
        async with serving([holding], max_concurrent=8, retry=QUICK) as runner:
            early = [
                await runner.start("provision", new_subject(), user_id, GRAPH) for _ in range(2)
            ]
            for op in early:
                await wait_for(db_pool, op.id, lambda o: o.step == "create_role")
            await holding.holding.wait()
            assert await recorded(db_pool, [op.resource_id for op in early]) == [second.name] * 2

            await proxy.refuse()  # the second server goes away mid-burst
            holding.release.set()
            late = [
                await runner.start("provision", new_subject(), user_id, GRAPH) for _ in range(4)
            ]
            # The new graphs go to the first server (past its weight: it is the only one that
            # answers), without waiting.
            for op in late:
                done = await wait_for(db_pool, op.id, limit=30)
                assert done.status == "completed" and done.waiting_since is None, done
            assert await recorded(db_pool, [op.resource_id for op in late]) == [first.name] * 4

            # Those created on the second server before it went wait for it...
            for op in early:
                await wait_for(db_pool, op.id, lambda o: o.status == "waiting")
            await proxy.accept()
            # ...and complete there when it is back.
            for op in early:
                done = await wait_for(db_pool, op.id, limit=30)
                assert done.status == "completed", done
            assert await recorded(db_pool, [op.resource_id for op in early]) == [second.name] * 2
    assert hooks.failed == []
    assert len(hooks.succeeded) == 6
    on_second = sorted(second_prefix + op.resource_id for op in early)
    on_first = sorted(second_prefix + op.resource_id for op in late)
    assert sorted((await server_objects(second_pg_dsn, second_prefix))[0]) == on_second
    assert sorted((await server_objects(pg_admin_dsn, second_prefix))[0]) == on_first


async def test_a_server_that_refuses_is_passed_over_at_once(
    db_pool: asyncpg.Pool,
    redis: Redis,
    redis_prefix: str,
    serving: Serving,
    user_id: str,
    second_prefix: str,
    pg_admin_dsn: str,
    second_pg_dsn: str,
) -> None:
    async with fault_proxy("second", second_pg_dsn) as proxy:
        await proxy.refuse()
        first = server(pg_admin_dsn, weight=1)
        second = server(url_through(second_pg_dsn, proxy.port), weight=10)
        placed = placed_over(db_pool, [first, second], second_prefix)
        async with serving([placed], retry=QUICK) as runner:
            op = await runner.start("provision", new_subject(), user_id, GRAPH)
            done = await wait_for(db_pool, op.id)
        assert done.status == "completed"
        assert await recorded(db_pool, [op.resource_id]) == [first.name]
        events = await operation_events(redis, redis_prefix, op.id)
        assert "operation.waiting" not in [e["type"] for e in events]
        assert placed.health.is_down(second.name)
        # Until it answers again: once the mark has lapsed, the next placement checks it.
        await proxy.accept()
        placed.health.down_seconds = 0.0
        placed.health.mark_down(second.name)
        async with serving([placed], retry=QUICK) as runner:
            back = await runner.start("provision", new_subject(), user_id, GRAPH)
            assert (await wait_for(db_pool, back.id)).status == "completed"
        assert await recorded(db_pool, [back.resource_id]) == [second.name]
        assert not placed.health.is_down(second.name)


async def test_a_drained_server_gets_no_new_graph(
    db_pool: asyncpg.Pool,
    serving: Serving,
    user_id: str,
    second_prefix: str,
    pg_admin_dsn: str,
    second_pg_dsn: str,
) -> None:
    first, second = server(pg_admin_dsn, weight=1), server(second_pg_dsn, weight=10)
    placed = placed_over(db_pool, [first, second], second_prefix)
    async with db_pool.acquire() as conn:
        await set_drained(conn, second.name, True)
    async with serving([placed], max_concurrent=4) as runner:
        ops = [await runner.start("provision", new_subject(), user_id, GRAPH) for _ in range(2)]
        for op in ops:
            assert (await wait_for(db_pool, op.id)).status == "completed"
        assert await recorded(db_pool, [op.resource_id for op in ops]) == [first.name] * 2

        async with db_pool.acquire() as conn:
            await set_drained(conn, second.name, False)
        again = await runner.start("provision", new_subject(), user_id, GRAPH)
        assert (await wait_for(db_pool, again.id)).status == "completed"
        assert await recorded(db_pool, [again.resource_id]) == [second.name]


async def test_with_every_server_drained_a_provision_waits_for_one(
    db_pool: asyncpg.Pool,
    serving: Serving,
    user_id: str,
    second_prefix: str,
    pg_admin_dsn: str,
    second_pg_dsn: str,
) -> None:
    first, second = server(pg_admin_dsn, weight=5), server(second_pg_dsn, weight=5)
    placed = placed_over(db_pool, [first, second], second_prefix)
    async with db_pool.acquire() as conn:
        await set_drained(conn, first.name, True)
        await set_drained(conn, second.name, True)
    async with serving([placed], retry=QUICK) as runner:
        op = await runner.start("provision", new_subject(), user_id, GRAPH)
        await wait_for(db_pool, op.id, lambda o: o.status == "waiting")
        async with db_pool.acquire() as conn:
            await set_drained(conn, second.name, False)
        assert (await wait_for(db_pool, op.id)).status == "completed"
    assert await recorded(db_pool, [op.resource_id]) == [second.name]


async def test_a_provision_no_server_answered_is_cancelled_without_waiting(
    db_pool: asyncpg.Pool,
    serving: Serving,
    user_id: str,
    second_prefix: str,
    pg_admin_dsn: str,
    second_pg_dsn: str,
) -> None:
    async with (
        fault_proxy("first", pg_admin_dsn) as one,
        fault_proxy("second", second_pg_dsn) as two,
    ):
        await one.refuse()
        await two.refuse()
        servers = [
            server(url_through(pg_admin_dsn, one.port), weight=5),
            server(url_through(second_pg_dsn, two.port), weight=5),
        ]
        placed = placed_over(db_pool, servers, second_prefix)
        async with serving([placed], retry=QUICK) as runner:
            op = await runner.start("provision", new_subject(), user_id, GRAPH)
            await wait_for(db_pool, op.id, lambda o: o.status == "waiting")
            with anyio.fail_after(5):  # its rollback has nothing to remove, anywhere
                cancelled = await runner.cancel(op.id)
        assert cancelled.status == "cancelled"
        async with db_pool.acquire() as conn:
            resource = await get_resource(conn, op.resource_id)
        assert resource is not None and resource.status == "deleted" and not resource.placed


async def test_graphs_made_before_servers_were_named_stay_on_the_first(
    db_pool: asyncpg.Pool,
    serving: Serving,
    user_id: str,
    second_prefix: str,
    pg_admin_dsn: str,
    second_pg_dsn: str,
) -> None:
    first, second = server(pg_admin_dsn, weight=5), server(second_pg_dsn, weight=50)
    only = placed_over(db_pool, [first], second_prefix)
    async with serving([only]) as runner:
        op = await runner.start("provision", new_subject(), user_id, GRAPH)
        assert (await wait_for(db_pool, op.id)).status == "completed"
    # As a graph made before migration 0016: no server recorded.
    await db_pool.execute("UPDATE resources SET server = NULL WHERE id = $1", op.resource_id)

    # The second server is added after it; the older graph is still found on the first.
    placed = placed_over(db_pool, [first, second], second_prefix)
    credentials = await placed.rotate_credentials(op.resource_id)
    assert credentials.port == await port_of(pg_admin_dsn)
    assert await placed.name_older_graphs() == 1  # as each instance does at start
    assert await recorded(db_pool, [op.resource_id]) == [first.name]
    await placed.teardown(op.resource_id)
    assert await server_objects(pg_admin_dsn, second_prefix) == ([], [])


async def test_placements_wait_for_each_other_across_instances(
    database_url: str,
    publisher: EventPublisher,
    hooks: RecordingHooks,
    user_id: str,
    second_prefix: str,
    pg_admin_dsn: str,
    second_pg_dsn: str,
) -> None:
    """Four graphs at once on two instances spread 2-2 over equal servers: each placement
    counts the ones decided before it (under PLACEMENT_LOCK_ID)."""
    first, second = server(pg_admin_dsn, weight=5), server(second_pg_dsn, weight=5)
    ops = []
    # Room for two runners with four placements waiting at once.
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=24)
    try:
        async with (
            running(
                pool, publisher, hooks, [placed_over(pool, [first, second], second_prefix)]
            ) as one,
            running(
                pool, publisher, hooks, [placed_over(pool, [first, second], second_prefix)]
            ) as two,
        ):
            async with pool.acquire() as conn, conn.transaction():
                # Held while the four start: they all reach placement before any is decided.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", PLACEMENT_LOCK_ID)
                for runner in (one, two, one, two):
                    ops.append(await runner.start("provision", new_subject(), user_id, GRAPH))
                await anyio.sleep(0.5)
            for op in ops:
                assert (await wait_for(pool, op.id)).status == "completed"
        servers = await recorded(pool, [op.resource_id for op in ops])
    finally:
        await pool.close()
    assert sorted(servers) == sorted([first.name, first.name, second.name, second.name])


async def test_an_orphan_is_removed_from_its_own_server(
    db_pool: asyncpg.Pool,
    serving: Serving,
    hooks: RecordingHooks,
    user_id: str,
    second_prefix: str,
    pg_admin_dsn: str,
    second_pg_dsn: str,
) -> None:
    first, second = server(pg_admin_dsn, weight=1), server(second_pg_dsn, weight=5)
    placed = placed_over(db_pool, [first, second], second_prefix)
    async with serving([placed]) as runner:
        op = await runner.start("provision", new_subject(), user_id, GRAPH)
        assert (await wait_for(db_pool, op.id)).status == "completed"
    assert await recorded(db_pool, [op.resource_id]) == [second.name]
    # As a removal that gave up while its server was away.
    await db_pool.execute(
        "UPDATE resources SET status = 'orphaned', updated_at = now() - interval '1 hour'"
        " WHERE id = $1",
        op.resource_id,
    )
    reaper = OrphanReaper(db_pool, hooks, {"graph": placed}, interval=60)
    assert await reaper.reap_once() == 1
    assert await server_objects(second_pg_dsn, second_prefix) == ([], [])


async def test_with_one_server_a_graph_is_pinned_without_waiting_for_other_placements(
    db_pool: asyncpg.Pool, serving: Serving, user_id: str, second_prefix: str, pg_admin_dsn: str
) -> None:
    """Nothing to choose between: the server is probed and the graph pinned, without the
    placement lock or the count of every graph."""
    only = server(pg_admin_dsn, weight=5)
    placed = placed_over(db_pool, [only], second_prefix)
    async with serving([placed]) as runner, db_pool.acquire() as conn, conn.transaction():
        # Held by another instance's placement for the whole provision.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", PLACEMENT_LOCK_ID)
        op = await runner.start("provision", new_subject(), user_id, GRAPH)
        assert (await wait_for(db_pool, op.id)).status == "completed"
    assert await recorded(db_pool, [op.resource_id]) == [only.name]
    await placed.teardown(op.resource_id)


async def test_with_its_only_server_drained_a_provision_waits_for_it(
    db_pool: asyncpg.Pool, serving: Serving, user_id: str, second_prefix: str, pg_admin_dsn: str
) -> None:
    only = server(pg_admin_dsn, weight=5)
    placed = placed_over(db_pool, [only], second_prefix)
    async with db_pool.acquire() as conn:
        await set_drained(conn, only.name, True)
    try:
        async with serving([placed], retry=QUICK) as runner:
            op = await runner.start("provision", new_subject(), user_id, GRAPH)
            await wait_for(db_pool, op.id, lambda o: o.status == "waiting")
            async with db_pool.acquire() as conn:
                resource = await get_resource(conn, op.resource_id)
                assert resource is not None and not resource.placed
                await set_drained(conn, only.name, False)
            assert (await wait_for(db_pool, op.id)).status == "completed"
    finally:
        async with db_pool.acquire() as conn:
            await set_drained(conn, only.name, False)
    assert await recorded(db_pool, [op.resource_id]) == [only.name]
    await placed.teardown(op.resource_id)
