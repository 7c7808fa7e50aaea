"""Provisioning's tables are migrated from provisioning/migrations, in one sequence with the
app's: a fresh database and one migrated before the files moved end up identical."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from importlib import resources

import asyncpg
import pytest

from app.db import Connection, _migration_files, migrate
from tests.support import database_dsn

pytestmark = pytest.mark.anyio

# What the schema is, in a form two databases can be compared by.
SCHEMA = """
SELECT 'column ' || table_name || '.' || column_name || ' ' || data_type || ' '
       || is_nullable || ' ' || coalesce(column_default, '') AS item
  FROM information_schema.columns WHERE table_schema = 'public'
UNION ALL
SELECT 'constraint ' || conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid)
  FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL
SELECT 'index ' || indexdef FROM pg_indexes WHERE schemaname = 'public'
ORDER BY 1
"""


@pytest.fixture
async def empty_database(pg_admin_dsn: str) -> AsyncIterator[asyncpg.Connection[asyncpg.Record]]:
    admin = await asyncpg.connect(pg_admin_dsn)
    name = f"lookout_migrations_{os.getpid()}_{id(admin)}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    conn = await asyncpg.connect(database_dsn(pg_admin_dsn, name))
    try:
        yield conn
    finally:
        await conn.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _schema(conn: Connection) -> tuple[list[str], list[str]]:
    names = [r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations ORDER BY 1")]
    return [r["item"] for r in await conn.fetch(SCHEMA)], names


def test_provisioning_tables_come_from_provisioning_migrations() -> None:
    moved = sorted(f.name for f in (resources.files("provisioning") / "migrations").iterdir())
    assert "0003_provisioning.sql" in moved
    names = [name for name, _ in _migration_files()]
    assert names == sorted(names)
    assert len(names) == len(set(names))


async def test_a_fresh_and_an_existing_database_end_up_identical(
    db_pool: asyncpg.Pool, empty_database: asyncpg.Connection[asyncpg.Record]
) -> None:
    # `db_pool`'s database was migrated from scratch. `empty_database` plays one migrated by
    # an earlier version, up to 0005 (before some provisioning files moved), by hand.
    conn = empty_database
    await conn.execute(
        "CREATE TABLE schema_migrations ("
        " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    for name, sql in _migration_files():
        if name > "0005":
            break
        await conn.execute(sql)
        await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)

    applied = await migrate(conn)
    assert applied and all(name > "0005" for name in applied)
    async with db_pool.acquire() as fresh:
        expected = await _schema(fresh)
    assert await _schema(conn) == expected
    assert await migrate(conn) == []
