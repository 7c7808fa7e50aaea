"""The asyncpg pool and the schema migrations."""

from __future__ import annotations

import logging
from importlib import resources
from importlib.resources.abc import Traversable
from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from provisioning.pgadmin import quote_ident

__all__ = [
    "Connection",
    "DatabaseUnavailable",
    "MigrationConflict",
    "create_pool",
    "keep_private",
    "migrate",
]

# What query functions take: a plain connection or one borrowed from the pool.
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

logger = logging.getLogger(__name__)

# Any fixed number works; it only has to be the same for every instance.
MIGRATION_LOCK_ID = 0x10_0C_00_07


class DatabaseUnavailable(Exception):
    """PostgreSQL did not answer at DATABASE_URL."""


async def create_pool(dsn: str, *, min_size: int = 10, max_size: int = 40) -> asyncpg.Pool:
    """Ten connections are kept open so that a burst of webhooks does not wait for new ones
    (a connection costs a TCP, perhaps TLS, and authentication handshake)."""
    try:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=10,
            command_timeout=30,
            reset=_keep_session,
        )
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise DatabaseUnavailable(
            f"DATABASE_URL: PostgreSQL does not answer ({exc.__class__.__name__}: {exc})"
        ) from exc
    return pool


async def _keep_session(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Lookout leaves no session state on a pooled connection (no LISTEN, no session SET, no
    advisory lock but `migrate`'s, which it releases), and asyncpg still rolls back an open
    transaction: so the reset query, one more round trip on every release, is skipped. Under a
    burst of 100 payments that round trip was a tenth of the server's time."""


# Each layer keeps the migrations of its own tables (provisioning/migrations: operations,
# resources). The numbers are one sequence across the folders, so that every database, fresh
# or migrated before a file moved, applies them in the same order; a name is what
# schema_migrations records, so a file keeps its name when it moves to another folder.
MIGRATION_PACKAGES = ("app", "provisioning")


class MigrationConflict(RuntimeError):
    """Two migration folders hold files of the same name; rename the newer one."""


def _migration_files() -> list[tuple[str, str]]:
    found: dict[str, tuple[str, Traversable]] = {}
    for package in MIGRATION_PACKAGES:
        for f in (resources.files(package) / "migrations").iterdir():
            name = f.name.removesuffix(".sql")
            if name == f.name:
                continue
            if name in found:
                raise MigrationConflict(
                    f"migration {name} is in both {found[name][0]}/migrations and"
                    f" {package}/migrations; give the newer one the next free number"
                )
            found[name] = (package, f)
    return [(name, found[name][1].read_text()) for name in sorted(found)]


async def migrate(conn: Connection) -> list[str]:
    """Applies the migrations not yet applied (of every ``MIGRATION_PACKAGES``), each once, in
    the order of their names; answers their names.

    The advisory lock makes instances that start together wait for each other instead of
    racing on the same `CREATE TABLE`.
    """
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        for name, sql in _migration_files():
            if name in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
            logger.info("applied migration %s", name)
            applied.append(name)
        await keep_private(conn)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    return applied


async def keep_private(conn: Connection) -> bool:
    """Takes CONNECT and TEMPORARY on Lookout's database from PUBLIC, granting them to
    Lookout's own role first; answers whether it changed anything.

    By default the customer databases go to this same server, and PostgreSQL lets every role
    open every database (PUBLIC has CONNECT): a customer's login could open Lookout's. Run at
    every start, since a database restored or created from a template has the default ACL
    again. Any other role that must open this database (monitoring, backups) needs its own
    GRANT CONNECT; a role that may not change the ACL (neither owner nor superuser) only
    warns.
    """
    found = await conn.fetchrow(
        "SELECT d.datname, has_database_privilege('public', d.oid, 'CONNECT') AS open,"
        " pg_has_role(current_user, d.datdba, 'USAGE') OR r.rolsuper AS may"
        " FROM pg_database d, pg_roles r"
        " WHERE d.datname = current_database() AND r.rolname = current_user"
    )
    if found is None or not found["open"]:
        return False
    db = quote_ident(found["datname"])
    if not found["may"]:
        logger.warning(
            "every role on this server may open Lookout's database; as its owner run"
            " REVOKE CONNECT, TEMPORARY ON DATABASE %s FROM PUBLIC (after granting CONNECT to"
            " the roles that need it), or use a server of its own for customer databases",
            db,
        )
        return False
    try:
        async with conn.transaction():
            await conn.execute(f"GRANT CONNECT, TEMPORARY ON DATABASE {db} TO CURRENT_USER")
            await conn.execute(f"REVOKE CONNECT, TEMPORARY ON DATABASE {db} FROM PUBLIC")
    except asyncpg.InsufficientPrivilegeError as exc:
        # Not worth refusing to start over: say what to do instead.
        logger.warning("could not take CONNECT on database %s from PUBLIC: %s", db, exc)
        return False
    logger.info("took CONNECT on database %s from PUBLIC; Lookout's role keeps it", db)
    return True
