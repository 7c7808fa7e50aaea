"""Real PostgreSQL and Redis for every test: the servers of DATABASE_URL / REDIS_URL when set,
embedded ones otherwise; a fresh migrated database and a flushed Redis database per test."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from app.cli.embedded import embedded_servers
from app.db import migrate
from app.settings import Settings
from tests.support import database_dsn
from tests.support.demo import server_data_dir
from tests.support.redis_cluster import LocalCluster, local_cluster

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def _servers() -> Iterator[tuple[str, str]]:
    with embedded_servers(
        ROOT / ".lookout" / "test-servers",
        database_url=os.environ.get("DATABASE_URL") or None,
        redis_url=os.environ.get("REDIS_URL") or None,
    ) as servers:
        yield servers.database_url, servers.redis_url


@pytest.fixture(scope="session")
def pg_admin_dsn(_servers: tuple[str, str]) -> str:
    """A DSN of the test PostgreSQL server, as a role that may create databases and roles."""
    return _servers[0]


@pytest.fixture(scope="session")
def redis_url(_servers: tuple[str, str]) -> str:
    return _servers[1]


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A local Redis Cluster of three primaries, started once for the tests that ask for it
    (the streams tests' "cluster" parameter); a test flushes it (``FLUSHDB`` on each primary)."""
    # Nothing kept on disk: no test of this one restarts a node (those make their own).
    with local_cluster(tmp_path_factory.mktemp("redis-cluster"), persistence="none") as cluster:
        yield cluster


@pytest.fixture(scope="session")
def second_pg_dsn(redis_url: str) -> Iterator[str]:
    """A second PostgreSQL server of its own (the embedded one, on a free port of 127.0.0.1,
    with a password), for the tests of several provisioning servers: its admin DSN. Kept
    under .lookout/ as the first one is (pytest's temporary folders are made private again by
    each new session, which a server running as another user cannot survive)."""
    with embedded_servers(
        ROOT / ".lookout" / "test-second-server", database_url=None, redis_url=redis_url
    ) as servers:
        yield servers.database_url


@pytest.fixture(scope="session")
def _template_database(pg_admin_dsn: str) -> Iterator[str]:
    """One migrated database per session; each test copies it, which is much faster than
    migrating again."""
    name = f"lookout_template_{secrets.token_hex(4)}"

    async def create() -> None:
        admin = await asyncpg.connect(pg_admin_dsn)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        conn = await asyncpg.connect(database_dsn(pg_admin_dsn, name))
        try:
            await migrate(conn)
        finally:
            await conn.close()

    async def drop() -> None:
        admin = await asyncpg.connect(pg_admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    asyncio.run(create())
    yield name
    asyncio.run(drop())


@pytest.fixture
async def database_url(pg_admin_dsn: str, _template_database: str) -> AsyncIterator[str]:
    """A fresh, migrated database of its own for this test."""
    name = f"lookout_test_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{_template_database}"')
    finally:
        await admin.close()
    yield database_dsn(pg_admin_dsn, name)
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def db_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=10)
    yield pool
    await pool.close()


@pytest.fixture
def redis_prefix() -> str:
    return f"lookout-test-{secrets.token_hex(4)}:"


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
def settings(database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path) -> Settings:
    """Production-like settings (not demo) for one test."""
    return Settings.from_env(
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "LOOKOUT_DATA_DIR": str(tmp_path / "data"),
            "LOOKOUT_SECRET_KEY": secrets.token_urlsafe(32),
            "STRIPE_API_KEY": "sk_test_lookout",
            "STRIPE_WEBHOOK_SECRET": "whsec_test_one,whsec_test_two",
            "STRIPE_API_BASE": "http://127.0.0.1:9",
            "LOOKOUT_REDIS_PREFIX": redis_prefix,
            "LOOKOUT_ENVIRONMENT": "test",
            # No databases made ahead of demand on the shared server unless a test asks for
            # them (tests/provisioning/test_warm_pool.py): they would outlive the test.
            "LOOKOUT_WARM_POOL_SIZE": "0",
        }
    )


@pytest.fixture
def servers_data_dir() -> Iterator[Path]:
    """A fresh LOOKOUT_DATA_DIR for a test's own embedded servers (see `server_data_dir`)."""
    with server_data_dir() as path:
        yield path
