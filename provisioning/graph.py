"""Graph plans: one PostgreSQL database per graph, opened only by the graph's own login role."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager

import asyncpg

from .backend import Credentials, OperationKind, Step, StepContext
from .errors import ProvisioningError, ResourceNotFound
from .pgadmin import (
    admin_connection,
    credentials_dsn,
    new_password,
    quote_ident,
    set_password,
    terminate_sessions,
    validate_resource_id,
)

__all__ = ["GRAPH_SCHEMA", "GraphBackend"]

logger = logging.getLogger(__name__)

# Applied in one transaction as the graph's role, so it is all there or not at all and the
# role owns every object.
GRAPH_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    labels      text[] NOT NULL DEFAULT '{}',
    properties  jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS edges (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_id   bigint NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    target_id   bigint NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    label       text NOT NULL,
    properties  jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS nodes_labels_idx ON nodes USING gin (labels);
CREATE INDEX IF NOT EXISTS nodes_properties_idx ON nodes USING gin (properties jsonb_path_ops);
CREATE INDEX IF NOT EXISTS edges_source_idx ON edges (source_id, label);
CREATE INDEX IF NOT EXISTS edges_target_idx ON edges (target_id, label);
CREATE INDEX IF NOT EXISTS edges_label_idx ON edges (label);
CREATE INDEX IF NOT EXISTS edges_properties_idx ON edges USING gin (properties jsonb_path_ops);
"""

_VERIFY = """
WITH a AS (INSERT INTO nodes (labels, properties) VALUES ('{Check}', '{"n": 1}') RETURNING id),
     b AS (INSERT INTO nodes (labels, properties) VALUES ('{Check}', '{"n": 2}') RETURNING id)
INSERT INTO edges (source_id, target_id, label) SELECT a.id, b.id, 'LINKS' FROM a, b
RETURNING id
"""


class GraphBackend:
    """Provisions graphs on the server of ``admin_dsn`` (a superuser or CREATEDB+CREATEROLE).

    A graph ``gr_x`` gets the database and the login role ``<name_prefix>gr_x``. The role owns
    the database and everything in it; CONNECT is revoked from PUBLIC, so no other non-superuser
    role can open it, whatever ``pg_hba.conf`` allows.
    """

    resource_type = "graph"
    id_prefix = "gr"

    def __init__(
        self, admin_dsn: str, *, name_prefix: str = "lookout_", connect_timeout: float = 10.0
    ) -> None:
        self._dsn = admin_dsn
        self._prefix = name_prefix
        self._timeout = connect_timeout

    def database_name(self, graph_id: str) -> str:
        return self._prefix + validate_resource_id(graph_id)

    def role_name(self, graph_id: str) -> str:
        return self._prefix + validate_resource_id(graph_id)

    def steps(self, kind: OperationKind) -> Sequence[Step]:
        if kind == "provision":
            return (
                Step("create_database", "Creating your graph's database", self._create_database),
                Step("create_role", "Creating your graph's login role", self._create_role),
                Step("grant_access", "Granting your role sole access", self._grant_access),
                Step("apply_schema", "Creating the nodes and edges tables", self._apply_schema),
                Step("verify", "Checking that your graph accepts connections", self._verify),
            )
        return (
            Step("revoke_access", "Revoking access to your graph", self._revoke_access),
            Step("drop_database", "Deleting your graph's database", self._drop_database),
            Step("drop_role", "Deleting your graph's login role", self._drop_role),
        )

    def _connect(
        self, graph_id: str, *, database: str | None = None, suffix: str = ""
    ) -> AbstractAsyncContextManager[asyncpg.Connection]:
        return admin_connection(
            self._dsn,
            tag=f"lookout:{graph_id}{suffix}",
            database=database,
            connect_timeout=self._timeout,
        )

    async def _create_database(self, ctx: StepContext) -> None:
        db = self.database_name(ctx.resource_id)
        limit = ctx.spec.limits.get("max_connections", -1)
        if limit == 0 or limit < -1:
            raise ProvisioningError(
                "Your plan allows no database connections, so no graph can be created for it."
            )
        async with self._connect(ctx.resource_id) as conn:
            if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", db):
                return
            try:
                # No IF NOT EXISTS and no transaction for CREATE DATABASE: check, then tolerate
                # losing the race to a concurrent attempt (which shows as either error).
                await conn.execute(f"CREATE DATABASE {quote_ident(db)} CONNECTION LIMIT {limit}")
            except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
                logger.info("database of graph %s already existed", ctx.resource_id)

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
            # Nobody learns this password: the customer gets one from rotate_credentials.
            await set_password(conn, role, new_password())

    async def _grant_access(self, ctx: StepContext) -> None:
        db, role = self.database_name(ctx.resource_id), self.role_name(ctx.resource_id)
        async with self._connect(ctx.resource_id) as conn, conn.transaction():
            await conn.execute(f"REVOKE ALL ON DATABASE {quote_ident(db)} FROM PUBLIC")
            await conn.execute(f"ALTER DATABASE {quote_ident(db)} OWNER TO {quote_ident(role)}")
            await conn.execute(
                f"GRANT CONNECT, TEMPORARY ON DATABASE {quote_ident(db)} TO {quote_ident(role)}"
            )

    async def _apply_schema(self, ctx: StepContext) -> None:
        db, role = self.database_name(ctx.resource_id), self.role_name(ctx.resource_id)
        async with self._connect(ctx.resource_id, database=db) as conn, conn.transaction():
            # Before PostgreSQL 15 every role may create in public; only the owner may now.
            await conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
            await conn.execute(f"SET LOCAL ROLE {quote_ident(role)}")
            await conn.execute(GRAPH_SCHEMA)

    async def _verify(self, ctx: StepContext) -> None:
        credentials = await self.rotate_credentials(ctx.resource_id)
        async with admin_connection(
            self._dsn,
            tag=f"lookout:{ctx.resource_id}",
            database=credentials.database,
            user=credentials.user,
            password=credentials.password,
            connect_timeout=self._timeout,
        ) as conn:
            tx = conn.transaction()
            await tx.start()
            try:
                if await conn.fetchval(_VERIFY) is None:
                    raise ProvisioningError("Your graph's database did not accept a test edge.")
            finally:
                await tx.rollback()
        async with self._connect(ctx.resource_id) as conn:
            if await conn.fetchval(
                "SELECT has_database_privilege('public', $1, 'CONNECT')", credentials.database
            ):
                raise ProvisioningError("Your graph's database could not be made private.")

    async def _revoke_access(self, ctx: StepContext) -> None:
        role = self.role_name(ctx.resource_id)
        async with self._connect(ctx.resource_id) as conn:
            if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                # The role owns the database, so it keeps its privileges on it: NOLOGIN is
                # what shuts it out.
                await conn.execute(f"ALTER ROLE {quote_ident(role)} NOLOGIN")
            await terminate_sessions(conn, role=role, database=self.database_name(ctx.resource_id))

    async def _drop_database(self, ctx: StepContext) -> None:
        db = self.database_name(ctx.resource_id)
        async with self._connect(ctx.resource_id, suffix=":drop") as conn:
            await terminate_sessions(conn, tag=f"lookout:{ctx.resource_id}", database=db)
            await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(db)} WITH (FORCE)")

    async def _drop_role(self, ctx: StepContext) -> None:
        role = self.role_name(ctx.resource_id)
        async with self._connect(ctx.resource_id, suffix=":drop") as conn:
            await terminate_sessions(conn, role=role)
            await conn.execute(f"DROP ROLE IF EXISTS {quote_ident(role)}")

    async def teardown(self, resource_id: str) -> None:
        db, role = self.database_name(resource_id), self.role_name(resource_id)
        async with self._connect(resource_id, suffix=":teardown") as conn:
            await terminate_sessions(conn, tag=f"lookout:{resource_id}", database=db, role=role)
            await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(db)} WITH (FORCE)")
            await conn.execute(f"DROP ROLE IF EXISTS {quote_ident(role)}")

    async def rotate_credentials(self, resource_id: str) -> Credentials:
        db, role = self.database_name(resource_id), self.role_name(resource_id)
        password = new_password()
        async with self._connect(resource_id, suffix=":credentials") as conn:
            found = await conn.fetchval(
                "SELECT count(*) FROM pg_database d, pg_roles r"
                " WHERE d.datname = $1 AND r.rolname = $2 AND r.rolcanlogin",
                db,
                role,
            )
            if not found:
                raise ResourceNotFound(f"graph {resource_id} has no database or login role")
            await set_password(conn, role, password)
        return Credentials(
            database=db,
            user=role,
            password=password,
            dsn=credentials_dsn(self._dsn, database=db, user=role, password=password),
        )
