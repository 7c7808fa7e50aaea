"""Shared-repository plans: one read-only database that every subscriber's role may read."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, suppress

import asyncpg

from .backend import Credentials, OperationKind, Step, StepContext
from .errors import ProvisioningError, ResourceNotFound
from .pgadmin import (
    admin_connection,
    connection_limit,
    credentials_dsn,
    new_password,
    quote_ident,
    set_password,
    terminate_sessions,
    validate_resource_id,
)

__all__ = ["REPOSITORY_SCHEMA", "SharedRepositoryBackend"]

logger = logging.getLogger(__name__)

# Taken (in the shared database: advisory locks are per database) around every change of the
# schema or of the database's ACL. Concurrent GRANTs on one database fail with "tuple
# concurrently updated", and CREATE TABLE IF NOT EXISTS can collide on pg_type. Any number
# works, the same everywhere.
_ACL_LOCK_ID = 0x10_0C_00_51

# {schema} is a quoted identifier. Idempotent: IF NOT EXISTS, ON CONFLICT DO NOTHING.
REPOSITORY_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.countries (
    code        text PRIMARY KEY,
    name        text NOT NULL,
    continent   text NOT NULL,
    population  bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS {schema}.cities (
    id           integer PRIMARY KEY,
    country_code text NOT NULL REFERENCES {schema}.countries (code),
    name         text NOT NULL,
    population   bigint NOT NULL
);
INSERT INTO {schema}.countries VALUES
    ('FR', 'France', 'Europe', 68000000), ('JP', 'Japan', 'Asia', 124000000),
    ('BR', 'Brazil', 'South America', 203000000), ('KE', 'Kenya', 'Africa', 55000000),
    ('CA', 'Canada', 'North America', 40000000)
ON CONFLICT DO NOTHING;
INSERT INTO {schema}.cities VALUES
    (1, 'FR', 'Paris', 2100000), (2, 'FR', 'Lyon', 520000), (3, 'JP', 'Tokyo', 14000000),
    (4, 'JP', 'Osaka', 2700000), (5, 'BR', 'São Paulo', 11400000), (6, 'KE', 'Nairobi', 4400000),
    (7, 'CA', 'Toronto', 2800000), (8, 'CA', 'Montréal', 1800000)
ON CONFLICT DO NOTHING;
"""


class SharedRepositoryBackend:
    """Grants read access to the shared repository (database ``database``, schema ``schema``).

    Each subscription ``repo_x`` gets its own login role ``<name_prefix>repo_x`` with CONNECT,
    USAGE and SELECT only, read-only transactions by default and, as its ``CONNECTION LIMIT``,
    the plan's ``max_connections`` (what tells a team plan from a reader's); deprovisioning
    revokes them and drops the role. The shared database owns nothing of the role's, and PUBLIC
    has no privilege on it, so a subscriber can neither write it nor lend it out.
    """

    resource_type = "repository"
    id_prefix = "repo"

    def __init__(
        self,
        admin_dsn: str,
        *,
        database: str = "lookout_shared",
        schema: str = "repository",
        name_prefix: str = "lookout_",
        connect_timeout: float = 10.0,
    ) -> None:
        self._dsn = admin_dsn
        self.database = database
        self.schema = schema
        self._prefix = name_prefix
        self._timeout = connect_timeout

    def role_name(self, resource_id: str) -> str:
        return self._prefix + validate_resource_id(resource_id)

    def steps(self, kind: OperationKind) -> Sequence[Step]:
        if kind == "provision":
            return (
                Step("ensure_repository", "Preparing the shared repository", self._ensure),
                Step("create_role", "Creating your login role", self._create_role),
                Step("grant_read", "Granting your role read access", self._grant_read),
                Step("verify", "Checking that your role can read the repository", self._verify),
            )
        if kind == "resize":
            return (
                Step("grant_read", "Applying your new plan's access", self._grant_read),
                Step("verify_access", "Checking your new limits", self._verify_access),
            )
        if kind == "suspend":
            # NOLOGIN, open sessions ended, every grant taken back; the role (and so its
            # password) stays for the resume.
            return (Step("revoke_read", "Revoking your read access", self._revoke_read),)
        if kind == "resume":
            return (
                Step("restore_login", "Letting your login in again", self._restore_login),
                Step("grant_read", "Granting your role read access again", self._grant_read),
                Step("verify_access", "Checking that your role reads again", self._verify_access),
            )
        return (
            Step("revoke_read", "Revoking your read access", self._revoke_read),
            Step("drop_role", "Deleting your login role", self._drop_role),
        )

    def _connect(
        self, resource_id: str, *, database: str | None = None, suffix: str = ""
    ) -> AbstractAsyncContextManager[asyncpg.Connection]:
        return admin_connection(
            self._dsn,
            tag=f"lookout:{resource_id}{suffix}",
            database=database,
            connect_timeout=self._timeout,
        )

    async def _ensure(self, ctx: StepContext) -> None:
        db = quote_ident(self.database)
        async with self._connect(ctx.resource_id) as conn:
            if not await conn.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", self.database
            ):
                # Losing the race to another instance shows as either error.
                with suppress(asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
                    await conn.execute(f"CREATE DATABASE {db}")
        async with (
            self._connect(ctx.resource_id, database=self.database) as conn,
            conn.transaction(),
        ):
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _ACL_LOCK_ID)
            await conn.execute(f"REVOKE ALL ON DATABASE {db} FROM PUBLIC")
            await conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
            await conn.execute(REPOSITORY_SCHEMA.format(schema=quote_ident(self.schema)))

    async def _create_role(self, ctx: StepContext) -> None:
        role = self.role_name(ctx.resource_id)
        async with self._connect(ctx.resource_id) as conn:
            if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                return
            try:
                await conn.execute(
                    f"CREATE ROLE {quote_ident(role)} LOGIN NOSUPERUSER NOCREATEDB"
                    " NOCREATEROLE NOREPLICATION NOBYPASSRLS"
                )
            except (asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError):
                return
            await set_password(conn, role, new_password())
            await conn.execute(
                f"ALTER ROLE {quote_ident(role)} SET default_transaction_read_only = on"
            )

    async def _grant_read(self, ctx: StepContext) -> None:
        role, schema = quote_ident(self.role_name(ctx.resource_id)), quote_ident(self.schema)
        async with (
            self._connect(ctx.resource_id, database=self.database) as conn,
            conn.transaction(),
        ):
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _ACL_LOCK_ID)
            await conn.execute(f"GRANT CONNECT ON DATABASE {quote_ident(self.database)} TO {role}")
            await conn.execute(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
            await conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role}")
            limit = connection_limit(ctx.spec.limits, what="access")
            await conn.execute(f"ALTER ROLE {role} CONNECTION LIMIT {limit}")

    async def _verify(self, ctx: StepContext) -> None:
        credentials = await self.rotate_credentials(ctx.resource_id)
        async with admin_connection(
            self._dsn,
            tag=f"lookout:{ctx.resource_id}",
            database=self.database,
            user=credentials.user,
            password=credentials.password,
            connect_timeout=self._timeout,
        ) as conn:
            table = f"{quote_ident(self.schema)}.countries"
            if not await conn.fetchval(f"SELECT count(*) FROM {table}"):
                raise ProvisioningError("The shared repository is empty; please contact support.")
            writable = await conn.fetchval(
                "SELECT has_table_privilege($1, 'INSERT')", f"{quote_ident(self.schema)}.countries"
            )
            if writable:
                raise ProvisioningError("The shared repository could not be made read-only.")
        async with self._connect(ctx.resource_id) as conn:
            limit = await conn.fetchval(
                "SELECT rolconnlimit FROM pg_roles WHERE rolname = $1", credentials.user
            )
        if limit != connection_limit(ctx.spec.limits, what="access"):
            raise ProvisioningError("Your plan's connection limit could not be set.")

    # -- changes of a live subscriber's access (issue 13) -----------------------------------
    async def _restore_login(self, ctx: StepContext) -> None:
        role = self.role_name(ctx.resource_id)
        async with self._connect(ctx.resource_id, suffix=":resume") as conn:
            if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                raise ProvisioningError("Your repository login could not be found.")
            await conn.execute(f"ALTER ROLE {quote_ident(role)} LOGIN")

    async def _verify_access(self, ctx: StepContext) -> None:
        """What the login may do, read from the catalog (no login: its password is the
        customer's and stays as it is)."""
        role = self.role_name(ctx.resource_id)
        table = f"{quote_ident(self.schema)}.countries"
        async with self._connect(ctx.resource_id, database=self.database) as conn:
            found = await conn.fetchrow(
                "SELECT r.rolcanlogin, r.rolconnlimit,"
                " has_database_privilege(r.rolname, current_database(), 'CONNECT') AS connect,"
                " has_table_privilege(r.rolname, $2, 'SELECT') AS reads,"
                " has_table_privilege(r.rolname, $2, 'INSERT') AS writes"
                " FROM pg_roles r WHERE r.rolname = $1",
                role,
                table,
            )
        limit = connection_limit(ctx.spec.limits, what="access")
        if (
            found is None
            or not (found["rolcanlogin"] and found["connect"] and found["reads"])
            or found["writes"]
        ):
            raise ProvisioningError("Your read access to the repository could not be restored.")
        if found["rolconnlimit"] != limit:
            raise ProvisioningError("Your plan's connection limit could not be set.")

    async def open_connections(self, resource_id: str) -> int:
        """Sessions of the subscriber's login now (``provisioning.ConnectionMeter``)."""
        async with self._connect(resource_id, suffix=":usage") as conn:
            count: int = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
                self.role_name(resource_id),
            )
        return count

    async def _revoke_read(self, ctx: StepContext) -> None:
        await self._revoke(ctx.resource_id)

    async def _drop_role(self, ctx: StepContext) -> None:
        await self._drop(ctx.resource_id)

    async def _revoke(self, resource_id: str) -> None:
        role_name = self.role_name(resource_id)
        role, schema = quote_ident(role_name), quote_ident(self.schema)
        async with self._connect(resource_id) as conn:
            has_role = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role_name)
            has_db = await conn.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", self.database
            )
            if not has_role:
                return
            await conn.execute(f"ALTER ROLE {role} NOLOGIN")
            await terminate_sessions(conn, role=role_name)
        if not has_db:
            return
        async with self._connect(resource_id, database=self.database) as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _ACL_LOCK_ID)
            if await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", self.schema):
                await conn.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM {role}")
                await conn.execute(f"REVOKE ALL ON SCHEMA {schema} FROM {role}")
            await conn.execute(f"REVOKE ALL ON DATABASE {quote_ident(self.database)} FROM {role}")
            # Whatever else the role was given in this database (nothing, normally).
            await conn.execute(f"DROP OWNED BY {role}")

    async def _drop(self, resource_id: str) -> None:
        role = self.role_name(resource_id)
        async with self._connect(resource_id, suffix=":drop") as conn:
            await terminate_sessions(conn, role=role)
            await conn.execute(f"DROP ROLE IF EXISTS {quote_ident(role)}")

    async def teardown(self, resource_id: str) -> None:
        async with self._connect(resource_id, suffix=":teardown") as conn:
            await terminate_sessions(conn, tag=f"lookout:{validate_resource_id(resource_id)}")
        await self._revoke(resource_id)
        await self._drop(resource_id)

    async def rotate_credentials(self, resource_id: str) -> Credentials:
        role = self.role_name(resource_id)
        password = new_password()
        async with self._connect(resource_id, suffix=":credentials") as conn:
            if not await conn.fetchval(
                "SELECT 1 FROM pg_roles WHERE rolname = $1 AND rolcanlogin", role
            ):
                raise ResourceNotFound(f"repository access {resource_id} has no login role")
            await set_password(conn, role, password)
        return Credentials(
            database=self.database,
            user=role,
            password=password,
            dsn=credentials_dsn(self._dsn, database=self.database, user=role, password=password),
        )
