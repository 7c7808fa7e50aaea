"""The warm pool: graph databases made ahead of demand, taken whole by provisions.

A taken database keeps its oid under the graph's name: that is how these tests tell a claim
(a rename) from a ``CREATE DATABASE``, which makes a new oid.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import anyio
import asyncpg
import pytest
from redis.asyncio import Redis

from provisioning import GraphBackend, OperationRecord, ResourceSpec, WarmPool, get_operation
from provisioning.backend import StepContext
from provisioning.errors import ProvisioningError
from provisioning.pgadmin import quote_ident
from provisioning.warm_pool import WARM_POOL_LOCK_CLASS, server_key
from tests.provisioning.support import (
    Serving,
    createrole_admin,
    new_subject,
    operation_events,
    server_objects,
    wait_for,
    with_admin,
)
from tests.provisioning.test_confinement import assert_confined
from tests.support.stack import wait_for as poll

pytestmark = pytest.mark.anyio

LIMIT = 3
GRAPH = ResourceSpec("graph", "graph-standard", {"max_resources": 10, "max_connections": LIMIT})


@pytest.fixture
async def warm(db_pool: asyncpg.Pool, graph_backend: GraphBackend) -> AsyncIterator[WarmPool]:
    """A pool of 2 on the test's server, that provisions of ``graph_backend`` take from."""
    pool = WarmPool(db_pool, graph_backend, size=2, instance_id=f"test-{secrets.token_hex(4)}")
    graph_backend.use_warm_pool(pool)
    yield pool
    graph_backend.use_warm_pool(None)


async def oids(admin_dsn: str, names: list[str]) -> dict[str, int]:
    rows = await with_admin(
        admin_dsn,
        lambda c: c.fetch(
            "SELECT datname, oid FROM pg_database WHERE datname = ANY($1::text[])", names
        ),
    )
    return {r["datname"]: r["oid"] for r in rows}


async def filled(
    warm: WarmPool, backend: GraphBackend, db_pool: asyncpg.Pool, admin_dsn: str
) -> dict[str, int]:
    """Fills the pool; answers the oid of each database in it, by its id."""
    await warm.fill()
    names = {backend.database_name(s): s for s in await spares(db_pool)}
    return {names[name]: oid for name, oid in (await oids(admin_dsn, list(names))).items()}


async def spares(db_pool: asyncpg.Pool, state: str = "ready") -> list[str]:
    rows = await db_pool.fetch("SELECT id FROM warm_pool WHERE state = $1 ORDER BY id", state)
    return [r["id"] for r in rows]


async def provision(
    db_pool: asyncpg.Pool, serving: Serving, backend: GraphBackend, user_id: str, count: int
) -> list[str]:
    """Provisions ``count`` graphs at once; answers their ids once all completed."""
    async with serving([backend], max_concurrent=4) as runner:
        ops = [await runner.start("provision", new_subject(), user_id, GRAPH) for _ in range(count)]
        for op in ops:
            done = await wait_for(db_pool, op.id)
            assert done.status == "completed", done.error
    return [op.resource_id for op in ops]


async def test_the_pool_fills_to_its_size_with_private_databases(
    warm: WarmPool, graph_backend: GraphBackend, db_pool: asyncpg.Pool, pg_admin_dsn: str
) -> None:
    assert await warm.fill() == 2
    assert await warm.fill() == 0  # full
    assert await warm.level() == 2
    made = await spares(db_pool)
    dbs, roles = await server_objects(pg_admin_dsn, graph_backend.name_prefix)
    assert sorted(dbs) == sorted([warm.template, *(graph_backend.database_name(s) for s in made)])
    assert len(roles) == 4
    rows = await with_admin(
        pg_admin_dsn,
        lambda c: c.fetch(
            "SELECT d.datname, pg_get_userbyid(d.datdba) AS owner, r.rolcanlogin,"
            " has_database_privilege('public', d.oid, 'CONNECT') AS public_connect"
            " FROM pg_database d JOIN pg_roles r ON r.rolname = d.datname"
            " WHERE d.datname = ANY($1::text[])",
            [graph_backend.database_name(s) for s in made],
        ),
    )
    assert {r["datname"]: dict(r) for r in rows} == {
        graph_backend.database_name(spare): {
            "datname": graph_backend.database_name(spare),
            "owner": graph_backend.owner_name(spare),
            "rolcanlogin": False,
            "public_connect": False,
        }
        for spare in made
    }
    # Each login was tested at the fill (logged in, a test edge), then shut out again: no
    # password is left behind.
    passwords = await with_admin(
        pg_admin_dsn,
        lambda c: c.fetch(
            "SELECT rolpassword FROM pg_authid WHERE rolname = ANY($1::text[])",
            [graph_backend.role_name(s) for s in made],
        ),
    )
    assert [r["rolpassword"] for r in passwords] == [None, None]
    template_open = await with_admin(
        pg_admin_dsn,
        lambda c: c.fetchval(
            "SELECT datallowconn FROM pg_database WHERE datname = $1", warm.template
        ),
    )
    assert template_open is False


async def test_a_provision_takes_a_pooled_database_and_its_customer_is_confined(
    warm: WarmPool,
    graph_backend: GraphBackend,
    db_pool: asyncpg.Pool,
    serving: Serving,
    user_id: str,
    pg_admin_dsn: str,
) -> None:
    before = await filled(warm, graph_backend, db_pool, pg_admin_dsn)

    (graph,) = await provision(db_pool, serving, graph_backend, user_id, 1)

    taken = await db_pool.fetchval("SELECT id FROM warm_pool WHERE claimed_by = $1", graph)
    after = await oids(pg_admin_dsn, [graph_backend.database_name(graph)])
    # Renamed, not created: the graph's database is the pooled one.
    assert after[graph_backend.database_name(graph)] == before[taken]
    assert await warm.level() == 1
    # Verified in the catalog, without logging in: no password was set for a test login.
    password = await with_admin(
        pg_admin_dsn,
        lambda c: c.fetchval(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1", graph_backend.role_name(graph)
        ),
    )
    assert password is None
    async with serving([graph_backend]) as runner:
        credentials = await runner.rotate_credentials(graph)
    assert credentials.database == graph_backend.database_name(graph)
    await assert_confined(credentials)
    conn = await asyncpg.connect(credentials.dsn)
    try:
        # The schema came with the pooled database, its tables the customer's own.
        owners = await conn.fetch("SELECT tableowner FROM pg_tables WHERE schemaname = 'public'")
        assert {r["tableowner"] for r in owners} == {credentials.user}
    finally:
        await conn.close()


async def test_an_empty_pool_falls_back_to_creating_the_database(
    warm: WarmPool,
    graph_backend: GraphBackend,
    db_pool: asyncpg.Pool,
    serving: Serving,
    user_id: str,
) -> None:
    assert await warm.level() == 0
    (graph,) = await provision(db_pool, serving, graph_backend, user_id, 1)
    assert await db_pool.fetchval("SELECT count(*) FROM warm_pool") == 0
    async with serving([graph_backend]) as runner:
        await assert_confined(await runner.rotate_credentials(graph))


async def test_concurrent_provisions_never_get_the_same_database(
    warm: WarmPool,
    graph_backend: GraphBackend,
    db_pool: asyncpg.Pool,
    serving: Serving,
    user_id: str,
    pg_admin_dsn: str,
) -> None:
    before = await filled(warm, graph_backend, db_pool, pg_admin_dsn)
    # Twice as many takes as there are databases, all at once.
    graphs = [f"gr_{secrets.token_hex(12)}" for _ in range(4)]
    taken: dict[str, bool] = {}

    async def take(graph: str) -> None:
        taken[graph] = await warm.take(graph, LIMIT)

    async with anyio.create_task_group() as tg:
        for graph in graphs:
            tg.start_soon(take, graph)
    winners = [g for g in graphs if taken[g]]
    assert len(winners) == 2
    claims = await db_pool.fetch("SELECT id, claimed_by FROM warm_pool WHERE state = 'claimed'")
    assert sorted(r["claimed_by"] for r in claims) == sorted(winners)
    after = await oids(pg_admin_dsn, [graph_backend.database_name(g) for g in winners])
    assert sorted(after.values()) == sorted(before.values())
    for graph in winners:
        await graph_backend.teardown(graph)

    # And through the runner: four provisions at once, two pooled databases, all complete.
    pooled = set((await filled(warm, graph_backend, db_pool, pg_admin_dsn)).values())
    provisioned = await provision(db_pool, serving, graph_backend, user_id, 4)
    got = await oids(pg_admin_dsn, [graph_backend.database_name(g) for g in provisioned])
    assert len(set(got.values())) == 4
    assert len(pooled & set(got.values())) == 2


async def test_deprovisioning_drops_the_database_and_gives_nothing_back(
    warm: WarmPool,
    graph_backend: GraphBackend,
    db_pool: asyncpg.Pool,
    serving: Serving,
    user_id: str,
    pg_admin_dsn: str,
) -> None:
    await warm.fill()
    subject = new_subject()
    async with serving([graph_backend]) as runner:
        op = await runner.start("provision", subject, user_id, GRAPH)
        assert (await wait_for(db_pool, op.id)).status == "completed"
        assert await warm.level() == 1
        gone = await runner.start("deprovision", subject, user_id, GRAPH)
        assert (await wait_for(db_pool, gone.id)).status == "completed"
    dbs, _ = await server_objects(pg_admin_dsn, graph_backend.database_name(op.resource_id))
    assert dbs == []
    assert await warm.level() == 1  # the pool only gets new databases
    assert await warm.fill() == 1
    assert op.resource_id not in await spares(db_pool)


async def test_a_crash_mid_refill_leaves_nothing_behind_after_the_sweep(
    warm: WarmPool, graph_backend: GraphBackend, db_pool: asyncpg.Pool, pg_admin_dsn: str
) -> None:
    """A process killed while making a database leaves its row `creating` and the database
    half-made (no roles, no grants); another instance's sweep drops both and refills."""
    spare = f"wp_{secrets.token_hex(12)}"
    await db_pool.execute(
        "INSERT INTO warm_pool (id, server, template, created_by)"
        " VALUES ($1, $2, $3, 'killed-instance')",
        spare,
        warm.server,
        warm.template,
    )
    await with_admin(
        pg_admin_dsn,
        lambda c: c.execute(f"CREATE DATABASE {quote_ident(graph_backend.database_name(spare))}"),
    )
    await with_admin(
        pg_admin_dsn,
        lambda c: c.execute(f"CREATE ROLE {quote_ident(graph_backend.owner_name(spare))}"),
    )
    assert await warm.fill() == 1  # the half-made one counts until it is swept

    assert await warm.sweep() == 1
    assert await db_pool.fetchval("SELECT count(*) FROM warm_pool WHERE id = $1", spare) == 0
    dbs, roles = await server_objects(pg_admin_dsn, graph_backend.database_name(spare))
    assert (dbs, roles) == ([], [])
    assert await warm.fill() == 1
    assert await warm.level() == 2


async def test_a_refill_stopped_midway_removes_what_it_made(
    warm: WarmPool, graph_backend: GraphBackend, db_pool: asyncpg.Pool, pg_admin_dsn: str
) -> None:
    """Shutting down while a database is being made: the refill removes it on its way out."""
    holder = await asyncpg.connect(pg_admin_dsn)
    try:
        # The template is being made elsewhere: the refill waits for it with its row reserved.
        await holder.execute(
            "SELECT pg_advisory_lock($1, hashtext($2))", WARM_POOL_LOCK_CLASS, warm.template
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(warm.fill)
            await poll(lambda: spares(db_pool, "creating"), within=10, what="a reserved row")
            tg.cancel_scope.cancel()
    finally:
        await holder.close()
    assert await db_pool.fetchval("SELECT count(*) FROM warm_pool") == 0
    dbs, roles = await server_objects(pg_admin_dsn, graph_backend.name_prefix)
    assert [d for d in dbs if d != warm.template] == [] and roles == []


async def test_the_sweep_removes_unrenamed_claims_old_templates_and_lost_databases(
    graph_backend: GraphBackend, db_pool: asyncpg.Pool, pg_admin_dsn: str, user_id: str
) -> None:
    warm = WarmPool(db_pool, graph_backend, size=3, instance_id="test-sweep", claimed_kept=0.0)
    await warm.fill()
    claimed, old, lost = await spares(db_pool)
    # Claimed by a graph whose provision is over, but never renamed (its step failed after).
    await db_pool.execute(
        "UPDATE warm_pool SET state = 'claimed', claimed_by = 'gr_gone', claimed_at = now()"
        " WHERE id = $1",
        claimed,
    )
    await db_pool.execute("UPDATE warm_pool SET template = 'older' WHERE id = $1", old)
    await with_admin(
        pg_admin_dsn,
        lambda c: c.execute(f"DROP DATABASE {quote_ident(graph_backend.database_name(lost))}"),
    )

    assert await warm.sweep() == 3
    assert await db_pool.fetchval("SELECT count(*) FROM warm_pool") == 0
    dbs, roles = await server_objects(pg_admin_dsn, graph_backend.name_prefix)
    assert dbs == [warm.template] and roles == []


async def test_a_smaller_size_drops_the_surplus(
    graph_backend: GraphBackend, db_pool: asyncpg.Pool
) -> None:
    big = WarmPool(db_pool, graph_backend, size=3, instance_id="test-big")
    assert await big.fill() == 3
    small = WarmPool(db_pool, graph_backend, size=1, instance_id="test-small")
    assert await small.sweep() == 2
    assert await small.level() == 1


async def test_an_admin_that_is_not_a_superuser_fills_and_gives_out_pooled_graphs(
    db_pool: asyncpg.Pool,
    serving: Serving,
    pg_admin_dsn: str,
    user_id: str,
    name_prefix: str,
) -> None:
    backend = GraphBackend(
        await createrole_admin(pg_admin_dsn, name_prefix), name_prefix=name_prefix
    )
    warm = WarmPool(db_pool, backend, size=1, instance_id="test-createrole")
    backend.use_warm_pool(warm)
    assert await warm.fill() == 1
    (graph,) = await provision(db_pool, serving, backend, user_id, 1)
    assert await warm.level() == 0
    async with serving([backend]) as runner:
        await assert_confined(await runner.rotate_credentials(graph))


def test_the_server_key_names_host_and_port_only() -> None:
    assert server_key("postgresql://admin:secret@db.example:6543/postgres") == "db.example:6543"
    assert server_key("postgresql:///postgres?host=/run/pg") == "/run/pg:5432"


# -- the limit on CREATE and DROP DATABASE (issue 15) --------------------------------------
@pytest.fixture
async def narrow(
    db_pool: asyncpg.Pool, pg_admin_dsn: str, name_prefix: str
) -> AsyncIterator[tuple[GraphBackend, WarmPool]]:
    """A backend allowed one CREATE or DROP DATABASE at a time, with a pool of 2."""
    backend = GraphBackend(pg_admin_dsn, name_prefix=name_prefix, heavy=anyio.CapacityLimiter(1))
    warm = WarmPool(db_pool, backend, size=2, instance_id=f"test-{secrets.token_hex(4)}")
    backend.use_warm_pool(warm)
    yield backend, warm
    backend.use_warm_pool(None)


async def waiters(limiter: anyio.CapacityLimiter, count: int) -> bool | None:
    return limiter.statistics().tasks_waiting == count or None


async def test_pooled_provisions_complete_while_create_database_is_saturated(
    narrow: tuple[GraphBackend, WarmPool],
    db_pool: asyncpg.Pool,
    serving: Serving,
    user_id: str,
    pg_admin_dsn: str,
    redis: Redis,
    redis_prefix: str,
) -> None:
    backend, warm = narrow
    pooled = set((await filled(warm, backend, db_pool, pg_admin_dsn)).values())
    # Someone else's CREATE DATABASE holds the only slot (a refill, a provision without a pool).
    elsewhere = object()
    await backend.heavy.acquire_on_behalf_of(elsewhere)
    try:
        async with serving([backend], max_concurrent=4) as runner:
            ops = [await runner.start("provision", new_subject(), user_id, GRAPH) for _ in range(3)]

            async def two_done() -> list[OperationRecord] | None:
                async with db_pool.acquire() as conn:
                    found = [await get_operation(conn, op.id) for op in ops]
                done = [op for op in found if op is not None and op.finalized_at is not None]
                return done if len(done) == 2 else None

            # Two take the pool's databases and complete without the slot.
            done = await poll(two_done, within=40, what="two pooled provisions")
            assert [op.status for op in done] == ["completed", "completed"]
            got = await oids(pg_admin_dsn, [backend.database_name(op.resource_id) for op in done])
            assert set(got.values()) == pooled
            # The third found the pool empty: its CREATE DATABASE waits for the slot.
            await poll(lambda: waiters(backend.heavy, 1), within=20, what="a CREATE waiting")
            (third,) = [op for op in ops if op.id not in {d.id for d in done}]
            waiting = await wait_for(db_pool, third.id, lambda op: op.step == "create_database")
            assert waiting.finished_at is None
            backend.heavy.release_on_behalf_of(elsewhere)
            elsewhere = None
            created = await wait_for(db_pool, third.id)
            assert created.status == "completed", created.error
    finally:
        if elsewhere is not None:
            backend.heavy.release_on_behalf_of(elsewhere)
    new = await oids(pg_admin_dsn, [backend.database_name(created.resource_id)])
    assert not set(new.values()) & pooled
    # A pooled graph skips the steps its database came with: no event for them.
    steps = [e.get("step") for e in await operation_events(redis, redis_prefix, done[0].id)]
    assert [s for s in steps if s] == ["check_limits", "create_database", "verify", "verify"]
    steps = [e.get("step") for e in await operation_events(redis, redis_prefix, created.id)]
    assert "apply_schema" in steps


async def test_the_refill_waits_for_the_create_database_limit(
    narrow: tuple[GraphBackend, WarmPool], db_pool: asyncpg.Pool
) -> None:
    backend, warm = narrow
    elsewhere = object()
    await backend.heavy.acquire_on_behalf_of(elsewhere)
    made: list[int] = []

    async def fill() -> None:
        made.append(await warm.fill())

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(fill)
            await poll(lambda: waiters(backend.heavy, 1), within=20, what="the refill waiting")
            assert await warm.level() == 0
            backend.heavy.release_on_behalf_of(elsewhere)
            elsewhere = None
    finally:
        if elsewhere is not None:
            backend.heavy.release_on_behalf_of(elsewhere)
    assert made == [2]
    assert await warm.level() == 2


@pytest.mark.parametrize(
    "undone",
    [
        "REVOKE CONNECT ON DATABASE {db} FROM {role}",
        "ALTER ROLE {role} NOLOGIN",
        "ALTER DATABASE {db} CONNECTION LIMIT -1",
        "GRANT CONNECT ON DATABASE {db} TO PUBLIC",
    ],
)
async def test_the_verify_of_a_pooled_graph_finds_what_its_claim_left_undone(
    undone: str, warm: WarmPool, graph_backend: GraphBackend, pg_admin_dsn: str
) -> None:
    """A pooled graph's verify does not log in (the fill did): what the claim changes is
    checked in the catalog, and a step of it missing fails the provision."""
    await warm.fill()
    graph = f"gr_{secrets.token_hex(12)}"
    ctx = StepContext(f"op_{secrets.token_hex(12)}", "provision", new_subject(), "u", graph, GRAPH)
    steps = {step.name: step for step in graph_backend.steps("provision")}
    try:
        await steps["create_database"].run(ctx)
        needed = steps["grant_access"].needed
        assert needed is not None and not needed(ctx)  # taken whole
        statement = undone.format(
            db=quote_ident(graph_backend.database_name(graph)),
            role=quote_ident(graph_backend.role_name(graph)),
        )
        await with_admin(pg_admin_dsn, lambda c: c.execute(statement))
        with pytest.raises(ProvisioningError, match="could not be made private"):
            await steps["verify"].run(ctx)
    finally:
        await graph_backend.teardown(graph)
