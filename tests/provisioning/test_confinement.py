"""A customer with a psql prompt: logged in with the revealed credentials (through TCP, as the
contract hands them out), its role tries each way out of its database and its plan.

On a server with trust authentication (the machine's, in development) the password proves
nothing, so every refusal here comes from privileges, which do not depend on authentication.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from urllib.parse import quote, urlsplit

import asyncpg
import pytest

from app.db import migrate
from provisioning import (
    Credentials,
    GraphBackend,
    PlacedGraphBackend,
    ResourceNotFound,
    ResourceSpec,
    SharedRepositoryBackend,
    StepContext,
    WarmPool,
)
from provisioning.servers import ProvisioningServer, set_drained
from tests.provisioning.support import (
    Serving,
    createrole_admin,
    new_subject,
    server_objects,
    wait_for,
    with_admin,
)

pytestmark = pytest.mark.anyio

LIMIT = 3
GRAPH = ResourceSpec("graph", "graph-standard", {"max_resources": 3, "max_connections": LIMIT})
REPOSITORY = ResourceSpec(
    "repository", "repository-reader", {"max_resources": 3, "max_connections": 2}
)


def database_of(dsn: str) -> str:
    return urlsplit(dsn).path.lstrip("/")


def as_customer(credentials: Credentials, database: str | None = None) -> str:
    """The revealed DSN, or the same login aimed at another database."""
    if database is None:
        return credentials.dsn
    parts = urlsplit(credentials.dsn)
    return parts._replace(path="/" + database).geturl()


async def log_in(dsn: str) -> None:
    """Opens a session and closes it again (a refused one raises)."""
    conn = await asyncpg.connect(dsn)
    await conn.close()


@asynccontextmanager
async def connections(dsn: str, count: int) -> AsyncIterator[Sequence[asyncpg.Connection]]:
    async with AsyncExitStack() as stack:
        opened = []
        for _ in range(count):
            conn = await asyncpg.connect(dsn)
            stack.push_async_callback(conn.close)
            opened.append(conn)
        yield opened


async def provision(
    db_pool: asyncpg.Pool,
    serving: Serving,
    backend: GraphBackend | PlacedGraphBackend | SharedRepositoryBackend,
    user_id: str,
    spec: ResourceSpec,
    count: int,
) -> list[Credentials]:
    async with serving([backend]) as runner:
        ops = [await runner.start("provision", new_subject(), user_id, spec) for _ in range(count)]
        for op in ops:
            done = await wait_for(db_pool, op.id)
            assert done.status == "completed", done.error
        return [await runner.rotate_credentials(op.resource_id) for op in ops]


@pytest.fixture(params=["created", "from the warm pool"])
async def graphs(
    request: pytest.FixtureRequest,
    db_pool: asyncpg.Pool,
    serving: Serving,
    graph_backend: GraphBackend,
    user_id: str,
) -> list[Credentials]:
    """Two customers' graphs, after Lookout's own start-up on its database (`migrate`, as
    `lookout serve` runs it); the first one's login is the customer trying its luck. Each
    test runs on graphs created by their provisions, and on graphs taken from a warm pool."""
    async with db_pool.acquire() as conn:
        await migrate(conn)
    if request.param == "created":
        return await provision(db_pool, serving, graph_backend, user_id, GRAPH, count=2)
    warm = WarmPool(db_pool, graph_backend, size=2, instance_id="test-confinement")
    assert await warm.fill() == 2
    graph_backend.use_warm_pool(warm)
    made = await provision(db_pool, serving, graph_backend, user_id, GRAPH, count=2)
    assert await warm.level() == 0
    return made


async def test_a_graph_login_cannot_lift_its_connection_limit(
    graphs: list[Credentials],
    graph_backend: GraphBackend,
    pg_admin_dsn: str,
    name_prefix: str,
) -> None:
    mine = graphs[0]
    async with connections(mine.dsn, 1) as (psql,):
        for statement in (
            f'ALTER DATABASE "{mine.database}" CONNECTION LIMIT -1',
            f'ALTER ROLE "{mine.user}" CONNECTION LIMIT -1',
            f'ALTER DATABASE "{mine.database}" OWNER TO "{mine.user}"',
        ):
            # Tried, and the sessions counted whatever happened.
            with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
                await psql.execute(statement)
        # The plan's number of sessions, and not one more.
        async with connections(mine.dsn, LIMIT - 1):
            with pytest.raises(asyncpg.TooManyConnectionsError):
                await log_in(mine.dsn)
        for statement in (
            f'ALTER DATABASE "{mine.database}" CONNECTION LIMIT -1',
            f'ALTER ROLE "{mine.user}" CONNECTION LIMIT -1',
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await psql.execute(statement)

    row = await with_admin(
        pg_admin_dsn,
        lambda c: c.fetchrow(
            "SELECT pg_get_userbyid(d.datdba) AS owner, d.datconnlimit, r.rolconnlimit"
            " FROM pg_database d, pg_roles r WHERE d.datname = $1 AND r.rolname = $2",
            mine.database,
            mine.user,
        ),
    )
    assert dict(row) == {
        "owner": graph_backend.owner_name(mine.database.removeprefix(name_prefix)),
        "datconnlimit": LIMIT,
        "rolconnlimit": LIMIT,
    }


async def test_a_graph_login_cannot_lend_its_database_out(graphs: list[Credentials]) -> None:
    mine, other = graphs
    async with connections(mine.dsn, 1) as (psql,):
        # A grant by a role that does not own the database grants nothing (a warning).
        await psql.execute(f'GRANT CONNECT ON DATABASE "{mine.database}" TO PUBLIC')
        await psql.execute(f'GRANT CONNECT ON DATABASE "{mine.database}" TO "{other.user}"')
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await log_in(as_customer(other, mine.database))


async def test_a_graph_login_opens_neither_lookouts_database_nor_another_customers(
    graphs: list[Credentials], database_url: str
) -> None:
    mine, other = graphs
    for database in (database_of(database_url), other.database):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await log_in(as_customer(mine, database))
    # Lookout itself still opens its own.
    await log_in(database_url)


async def test_a_graph_login_creates_no_role_database_or_schema(
    graphs: list[Credentials], name_prefix: str
) -> None:
    async with connections(graphs[0].dsn, 1) as (psql,):
        for statement in (
            f'CREATE ROLE "{name_prefix}escape" LOGIN SUPERUSER',
            f'CREATE ROLE "{name_prefix}escape"',
            f'CREATE DATABASE "{name_prefix}escape"',
            "CREATE SCHEMA escape",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await psql.execute(statement)


async def test_a_graph_login_still_uses_its_graph_freely(graphs: list[Credentials]) -> None:
    async with connections(graphs[0].dsn, 1) as (psql,):
        await psql.execute("INSERT INTO nodes (labels) VALUES ('{Person}')")
        await psql.execute("CREATE INDEX nodes_created_idx ON nodes (created_at)")
        await psql.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        await psql.execute("INSERT INTO notes VALUES (1, 'mine')")
        await psql.execute("CREATE TEMP TABLE scratch (x int)")
        assert await psql.fetchval("SELECT count(*) FROM nodes") == 1


async def make_it_old(admin_dsn: str, graph: Credentials) -> None:
    """Turns a graph back into what earlier versions made: its login role owned its database,
    with no connection limit of its own, and it had lifted the database's."""
    await with_admin(
        admin_dsn,
        lambda c: c.execute(
            f'ALTER DATABASE "{graph.database}" OWNER TO "{graph.user}";'
            f' ALTER ROLE "{graph.user}" CONNECTION LIMIT -1;'
            f' DROP ROLE "{graph.database}_owner"'
        ),
    )
    async with connections(graph.dsn, 1) as (psql,):
        await psql.execute(f'ALTER DATABASE "{graph.database}" CONNECTION LIMIT -1')


async def assert_confined(graph: Credentials) -> None:
    async with connections(graph.dsn, 1) as (psql,):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await psql.execute(f'ALTER DATABASE "{graph.database}" CONNECTION LIMIT -1')
        await psql.execute("INSERT INTO nodes (labels) VALUES ('{Still}')")
        await psql.execute("CREATE TABLE IF NOT EXISTS later (x int)")
        async with connections(graph.dsn, LIMIT - 1):
            with pytest.raises(asyncpg.TooManyConnectionsError):
                await log_in(graph.dsn)


async def test_a_graph_made_by_older_code_is_confined_when_its_steps_resume(
    db_pool: asyncpg.Pool,
    serving: Serving,
    graph_backend: GraphBackend,
    pg_admin_dsn: str,
    user_id: str,
    name_prefix: str,
) -> None:
    (mine,) = await provision(db_pool, serving, graph_backend, user_id, GRAPH, count=1)
    await make_it_old(pg_admin_dsn, mine)
    again = await provision_again(graph_backend, user_id, mine.database.removeprefix(name_prefix))
    await assert_confined(again)


async def test_confine_repairs_a_live_graph_made_by_older_code(
    db_pool: asyncpg.Pool,
    serving: Serving,
    graph_backend: GraphBackend,
    pg_admin_dsn: str,
    user_id: str,
    name_prefix: str,
) -> None:
    (mine,) = await provision(db_pool, serving, graph_backend, user_id, GRAPH, count=1)
    await make_it_old(pg_admin_dsn, mine)
    graph_id = mine.database.removeprefix(name_prefix)
    await graph_backend.confine(graph_id, GRAPH.limits)
    await graph_backend.confine(graph_id, GRAPH.limits)  # idempotent
    await assert_confined(mine)
    with pytest.raises(ResourceNotFound):
        await graph_backend.confine("gr_" + "0" * 24, GRAPH.limits)


async def provision_again(backend: GraphBackend, user_id: str, resource_id: str) -> Credentials:
    """Runs the provision steps again on an existing graph, as a resumed operation does."""
    ctx = StepContext(
        operation_id="op_again",
        kind="provision",
        subject_id=new_subject(),
        user_id=user_id,
        resource_id=resource_id,
        spec=GRAPH,
    )
    for step in backend.steps("provision"):
        await step.run(ctx)
    return await backend.rotate_credentials(resource_id)


async def test_a_repository_login_can_only_read_the_shared_repository(
    db_pool: asyncpg.Pool,
    serving: Serving,
    database_url: str,
    graph_backend: GraphBackend,
    pg_admin_dsn: str,
    user_id: str,
    name_prefix: str,
) -> None:
    async with db_pool.acquire() as conn:
        await migrate(conn)
    repository = SharedRepositoryBackend(
        pg_admin_dsn, database=f"{name_prefix}shared", name_prefix=name_prefix
    )
    (reader,) = await provision(db_pool, serving, repository, user_id, REPOSITORY, count=1)
    (graph,) = await provision(db_pool, serving, graph_backend, user_id, GRAPH, count=1)

    async with connections(reader.dsn, 1) as (psql,):
        assert await psql.fetchval("SELECT count(*) FROM repository.countries") == 5
        await psql.execute("SET default_transaction_read_only = off")
        for statement in (
            "INSERT INTO repository.countries VALUES ('XX', 'X', 'Y', 1)",
            "UPDATE repository.cities SET population = 0",
            "TRUNCATE repository.cities",
            "CREATE TABLE repository.mine (x int)",
            "CREATE TABLE public.mine (x int)",
            "CREATE TEMP TABLE mine (x int)",
            "CREATE SCHEMA mine",
            f'ALTER ROLE "{reader.user}" CONNECTION LIMIT -1',
            f'ALTER DATABASE "{reader.database}" CONNECTION LIMIT -1',
            f'CREATE ROLE "{name_prefix}escape"',
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await psql.execute(statement)
        async with connections(reader.dsn, 1):
            with pytest.raises(asyncpg.TooManyConnectionsError):
                await log_in(reader.dsn)

    for database in (database_of(database_url), graph.database):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await log_in(as_customer(reader, database))
    # Nor does a graph's login open the shared repository.
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await log_in(as_customer(graph, reader.database))


async def test_an_admin_that_is_not_a_superuser_provisions_and_removes_a_confined_graph(
    db_pool: asyncpg.Pool,
    serving: Serving,
    pg_admin_dsn: str,
    user_id: str,
    name_prefix: str,
) -> None:
    """`PROVISIONER_DATABASE_URL` may name a CREATEDB CREATEROLE role rather than a superuser."""
    admin_dsn = await createrole_admin(pg_admin_dsn, name_prefix)
    admin = f"{name_prefix}admin"
    backend = GraphBackend(admin_dsn, name_prefix=name_prefix)
    subject = new_subject()
    async with serving([backend]) as runner:
        op = await runner.start("provision", subject, user_id, GRAPH)
        done = await wait_for(db_pool, op.id)
        assert done.status == "completed", done.error
        mine = await runner.rotate_credentials(op.resource_id)
        await assert_confined(mine)
        sizes = await backend.storage_bytes()  # measured with the admin's own privileges
        assert list(sizes) == [op.resource_id] and sizes[op.resource_id] > 0
        gone = await runner.start("deprovision", subject, user_id, GRAPH)
        assert (await wait_for(db_pool, gone.id)).status == "completed"
    assert await server_objects(pg_admin_dsn, name_prefix) == ([], [admin])


async def test_a_graph_on_a_second_server_is_confined_there_and_known_nowhere_else(
    db_pool: asyncpg.Pool,
    serving: Serving,
    pg_admin_dsn: str,
    second_pg_dsn: str,
    user_id: str,
    second_prefix: str,
) -> None:
    """The second server asks for passwords (as the demo's does): the revealed one is real."""
    first, second = ProvisioningServer.parse(pg_admin_dsn), ProvisioningServer.parse(second_pg_dsn)
    placed = PlacedGraphBackend(
        db_pool,
        [(s, GraphBackend(s.dsn, name_prefix=second_prefix)) for s in (first, second)],
    )
    async with db_pool.acquire() as conn:
        await set_drained(conn, first.name, True)
    (mine,) = await provision(db_pool, serving, placed, user_id, GRAPH, count=1)
    async with db_pool.acquire() as conn:
        await set_drained(conn, first.name, False)
        await set_drained(conn, second.name, True)
    (other,) = await provision(db_pool, serving, placed, user_id, GRAPH, count=1)
    assert mine.port != other.port

    await assert_confined(mine)
    wrong = urlsplit(mine.dsn)._replace(netloc=f"{mine.user}:wrong@127.0.0.1:{mine.port}")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await log_in(wrong.geturl())
    # Its login is not a role of the first server, where the other customer's graph is.
    login = f"{quote(mine.user)}:{quote(mine.password, safe='')}"
    on_first = f"postgresql://{login}@{other.host}:{other.port}/{quote(other.database)}"
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await log_in(on_first)

    # Repairs go to the graph's own server.
    await make_it_old(second_pg_dsn, mine)
    await placed.confine(mine.database.removeprefix(second_prefix), GRAPH.limits)
    await assert_confined(mine)
