"""Lookout's own database is not open to every role on its server (customer logins live there
by default), and taking CONNECT from PUBLIC never locks Lookout itself out."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import asyncpg
import pytest

from app.db import keep_private, migrate

pytestmark = pytest.mark.anyio


def as_role(dsn: str, role: str, database: str) -> str:
    parts = urlsplit(dsn)  # a host and port, or a socket in ?host=
    server = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{role}:pw@{server}", path=f"/{database}").geturl()


@pytest.fixture
async def roles(pg_admin_dsn: str) -> AsyncIterator[tuple[str, str, str]]:
    """An owner role (Lookout's, not a superuser), a database it owns, and a stranger."""
    tag = secrets.token_hex(4)
    owner, stranger, db = f"lkp{tag}_lookout", f"lkp{tag}_stranger", f"lkp{tag}_db"
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        for role in (owner, stranger):
            await admin.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD 'pw'")
        await admin.execute(f'CREATE DATABASE "{db}" OWNER "{owner}"')
        yield owner, stranger, db
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        for role in (owner, stranger):
            await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()


async def test_migrate_takes_connect_from_public_and_keeps_it_for_lookout(
    pg_admin_dsn: str, roles: tuple[str, str, str]
) -> None:
    owner, stranger, db = roles
    # Before: any role on the server opens it (PostgreSQL's default).
    conn = await asyncpg.connect(as_role(pg_admin_dsn, stranger, db))
    await conn.close()

    lookout = await asyncpg.connect(as_role(pg_admin_dsn, owner, db))
    try:
        await migrate(lookout)
        assert await keep_private(lookout) is False  # already done: nothing to change
    finally:
        await lookout.close()

    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await asyncpg.connect(as_role(pg_admin_dsn, stranger, db))
    # Lookout's role opens it again (a restart), and migrating again changes nothing.
    lookout = await asyncpg.connect(as_role(pg_admin_dsn, owner, db))
    try:
        assert await migrate(lookout) == []
    finally:
        await lookout.close()


async def test_a_role_that_may_not_change_the_acl_only_warns(
    pg_admin_dsn: str, roles: tuple[str, str, str], caplog: pytest.LogCaptureFixture
) -> None:
    _, stranger, db = roles
    conn = await asyncpg.connect(as_role(pg_admin_dsn, stranger, db))
    try:
        with caplog.at_level(logging.WARNING, logger="app.db"):
            assert await keep_private(conn) is False
    finally:
        await conn.close()
    assert "REVOKE CONNECT, TEMPORARY ON DATABASE" in caplog.text
    # Still open: nothing was changed by a role without the right to.
    conn = await asyncpg.connect(as_role(pg_admin_dsn, stranger, db))
    await conn.close()
