"""A customer with a psql prompt: logged in with the revealed credentials (through TCP, as the
contract hands them out), its role tries each way out of its database and its plan.

On a server with trust authentication (the machine's, in development) the password proves
nothing, so every refusal here comes from privileges, which do not depend on authentication.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from urllib.parse import urlsplit

import asyncpg
import pytest

from app.db import migrate
from provisioning import (
    Credentials,
    GraphBackend,
    ResourceSpec,
    SharedRepositoryBackend,
    StepContext,
)
from streams import EventPublisher
from tests.provisioning.conftest import new_subject
from tests.provisioning.support import RecordingHooks, running, wait_for, with_admin

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
    publisher: EventPublisher,
    hooks: RecordingHooks,
    backend: GraphBackend | SharedRepositoryBackend,
    user_id: str,
    spec: ResourceSpec,
    count: int,
) -> list[Credentials]:
    async with running(db_pool, publisher, hooks, [backend]) as runner:
        ops = [await runner.start("provision", new_subject(), user_id, spec) for _ in range(count)]
        for op in ops:
            done = await wait_for(db_pool, op.id)
            assert done.status == "completed", done.error
        return [await runner.rotate_credentials(op.resource_id) for op in ops]


async def test_a_graph_login_cannot_escape_its_database_or_its_connection_limit(
    db_pool: asyncpg.Pool,
    database_url: str,
    publisher: EventPublisher,
    hooks: RecordingHooks,
    graph_backend: GraphBackend,
    pg_admin_dsn: str,
    user_id: str,
    name_prefix: str,
) -> None:
    # Lookout's own start-up, on its own database (as `lookout serve` runs it).
    async with db_pool.acquire() as conn:
        await migrate(conn)
    mine, other = await provision(db_pool, publisher, hooks, graph_backend, user_id, GRAPH, count=2)
    own_db = mine.database

    async with connections(mine.dsn, 1) as (psql,):
        assert await psql.fetchval("SELECT current_user") == mine.user
        # The limit of its database and its own role are not the customer's to lift.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await psql.execute(f'ALTER DATABASE "{own_db}" CONNECTION LIMIT -1')
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await psql.execute(f'ALTER ROLE "{mine.user}" CONNECTION LIMIT -1')
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await psql.execute(f'ALTER DATABASE "{own_db}" OWNER TO "{mine.user}"')
        # Nor may it lend its database out: a grant by a non-owner grants nothing.
        await psql.execute(f'GRANT CONNECT ON DATABASE "{own_db}" TO PUBLIC')
        await psql.execute(f'GRANT CONNECT ON DATABASE "{own_db}" TO "{other.user}"')
        assert not await psql.fetchval(
            "SELECT has_database_privilege('public', $1, 'CONNECT')", own_db
        )
        assert not await psql.fetchval(
            "SELECT has_database_privilege($1, $2, 'CONNECT')", other.user, own_db
        )
        # No new roles, databases or schemas.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await psql.execute(f'CREATE ROLE "{name_prefix}escape" LOGIN SUPERUSER')
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await psql.execute(f'CREATE ROLE "{name_prefix}escape"')
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await psql.execute(f'CREATE DATABASE "{name_prefix}escape"')
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await psql.execute("CREATE SCHEMA escape")
        # What the plan is for still works: its graph tables, tables of its own, temp tables.
        await psql.execute("INSERT INTO nodes (labels) VALUES ('{Person}')")
        await psql.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        await psql.execute("INSERT INTO notes VALUES (1, 'mine')")
        await psql.execute("CREATE TEMP TABLE scratch (x int)")

        # The plan's number of sessions, and not one more.
        async with connections(mine.dsn, LIMIT - 1):
            with pytest.raises(asyncpg.TooManyConnectionsError):
                await asyncpg.connect(mine.dsn)

    # Neither Lookout's database nor another customer's opens to it.
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await asyncpg.connect(as_customer(mine, database_of(database_url)))
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await asyncpg.connect(as_customer(mine, other.database))
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await asyncpg.connect(as_customer(other, own_db))

    # Lookout itself still opens its database, and the catalog says what the customer got.
    lookout = await asyncpg.connect(database_url)
    await lookout.close()
    row = await with_admin(
        pg_admin_dsn,
        lambda c: c.fetchrow(
            "SELECT pg_get_userbyid(d.datdba) AS owner, d.datconnlimit, r.rolconnlimit"
            " FROM pg_database d, pg_roles r WHERE d.datname = $1 AND r.rolname = $2",
            own_db,
            mine.user,
        ),
    )
    assert dict(row) == {
        "owner": graph_backend.owner_name(own_db.removeprefix(name_prefix)),
        "datconnlimit": LIMIT,
        "rolconnlimit": LIMIT,
    }


async def test_a_graph_made_by_older_code_is_confined_when_its_grants_are_redone(
    db_pool: asyncpg.Pool,
    publisher: EventPublisher,
    hooks: RecordingHooks,
    graph_backend: GraphBackend,
    pg_admin_dsn: str,
    user_id: str,
    name_prefix: str,
) -> None:
    """Before this change the login role owned its database: provisioning again (a resumed
    operation, a repair) hands the database to the owner role and sets the role's limit."""
    (mine,) = await provision(db_pool, publisher, hooks, graph_backend, user_id, GRAPH, count=1)
    await with_admin(
        pg_admin_dsn,
        lambda c: c.execute(
            f'ALTER DATABASE "{mine.database}" OWNER TO "{mine.user}";'
            f' ALTER ROLE "{mine.user}" CONNECTION LIMIT -1'
        ),
    )
    async with connections(mine.dsn, 1) as (psql,):
        await psql.execute(f'ALTER DATABASE "{mine.database}" CONNECTION LIMIT 7')

    again = await provision_again(graph_backend, user_id, mine.database.removeprefix(name_prefix))

    async with connections(again.dsn, 1) as (psql,):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await psql.execute(f'ALTER DATABASE "{again.database}" CONNECTION LIMIT -1')
        assert await psql.fetchval("SELECT count(*) FROM nodes") == 0
        async with connections(again.dsn, LIMIT - 1):
            with pytest.raises(asyncpg.TooManyConnectionsError):
                await asyncpg.connect(again.dsn)


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
    database_url: str,
    publisher: EventPublisher,
    hooks: RecordingHooks,
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
    (reader,) = await provision(db_pool, publisher, hooks, repository, user_id, REPOSITORY, count=1)
    (graph,) = await provision(db_pool, publisher, hooks, graph_backend, user_id, GRAPH, count=1)

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
                await asyncpg.connect(reader.dsn)

    for database in (database_of(database_url), graph.database):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await asyncpg.connect(as_customer(reader, database))
