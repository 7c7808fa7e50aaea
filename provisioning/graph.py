"""Graph plans: one PostgreSQL database per graph, opened only by the graph's own login role.

Who may do what, and why:

- ``<prefix>gr_x_owner`` (NOLOGIN) owns the database. Nobody logs in as it: it exists so that
  the customer's role does not own its database, since an owner may ``ALTER DATABASE ...
  CONNECTION LIMIT -1`` or ``GRANT CONNECT ... TO PUBLIC``.
- ``<prefix>gr_x`` (LOGIN, the customer's) has CONNECT and TEMPORARY on its database only,
  USAGE and CREATE on its ``public`` schema, and owns the graph tables it creates there. Its
  ``CONNECTION LIMIT`` is the plan's ``max_connections``; only a role with CREATEROLE may
  change it, which the customer's role is not.
- PUBLIC has nothing on the database, so no other non-superuser role can open it, whatever
  ``pg_hba.conf`` allows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Final, Protocol, runtime_checkable

import anyio
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

__all__ = ["GRAPH_SCHEMA", "HEAVY_AT_ONCE", "GraphBackend", "StorageMeter", "WarmSource"]

logger = logging.getLogger(__name__)

# CREATE DATABASE copies its template through the WAL (PostgreSQL 15's default strategy: several
# MB each) and DROP DATABASE writes and syncs as well: more than a few at once delay every other
# commit on the server (the webhook inbox's first) without finishing sooner. Measured with
# bench/billing.py when this limit held whole operations: at 10, webhook ack p99 65 ms and
# operation p99 666 ms; at 4, 19 and 330 ms, at the same 10 operations/s. The catalog statements
# of a provision that takes a pooled database (a rename, a role, grants) are not limited by it.
HEAVY_AT_ONCE: Final = 4

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


@runtime_checkable
class StorageMeter(Protocol):
    """A backend that can tell how much disk its resources take (measured, not enforced)."""

    async def storage_bytes(self) -> dict[str, int]:
        """The size in bytes of each resource's database on the server, by resource id."""
        ...


class WarmSource(Protocol):
    """Graph databases made ahead of demand (``provisioning.warm_pool.WarmPool``)."""

    async def take(self, graph_id: str, limit: int) -> bool:
        """Gives ``graph_id`` a database made ahead of demand, renamed to the graph's with its
        roles, grants, ``limit`` and schema: True when this call did it (nothing is left for
        the next steps to do); False when none was given (the caller creates what is missing)."""
        ...


class GraphBackend:
    """Provisions graphs on the server of ``admin_dsn`` (a superuser or CREATEDB+CREATEROLE).

    A graph ``gr_x`` gets the database and the login role ``<name_prefix>gr_x``, and the
    NOLOGIN role ``<name_prefix>gr_x_owner`` that owns the database (see the module's doc).
    """

    resource_type = "graph"
    id_prefix = "gr"

    def __init__(
        self,
        admin_dsn: str,
        *,
        name_prefix: str = "lookout_",
        connect_timeout: float = 10.0,
        heavy: anyio.CapacityLimiter | None = None,
    ) -> None:
        self._dsn = admin_dsn
        self._prefix = name_prefix
        self._timeout = connect_timeout
        self._heavy = heavy if heavy is not None else anyio.CapacityLimiter(HEAVY_AT_ONCE)
        # --- warm pool (issue 15) ---
        self._warm: WarmSource | None = None
        # Graphs whose database this process took whole from the warm pool: their role,
        # grant and schema steps have nothing left to do. Kept in memory only: an operation
        # resumed elsewhere runs those steps in full (they are idempotent).
        self._taken_whole: set[str] = set()

    @property
    def admin_dsn(self) -> str:
        return self._dsn

    @property
    def name_prefix(self) -> str:
        return self._prefix

    @property
    def heavy(self) -> anyio.CapacityLimiter:
        """Held around each ``CREATE DATABASE`` and ``DROP DATABASE`` on the server (see
        ``HEAVY_AT_ONCE``); the warm pool's refill holds it too. Share one among backends to
        bound them together (the app gives every server's backend the process's one)."""
        return self._heavy

    def use_warm_pool(self, source: WarmSource | None) -> None:
        """Provisions take a database made ahead of demand from ``source`` when it has one."""
        self._warm = source

    def database_name(self, graph_id: str) -> str:
        return self._prefix + validate_resource_id(graph_id)

    def role_name(self, graph_id: str) -> str:
        return self._prefix + validate_resource_id(graph_id)

    def owner_name(self, graph_id: str) -> str:
        return self._prefix + validate_resource_id(graph_id) + "_owner"

    def steps(self, kind: OperationKind) -> Sequence[Step]:
        if kind == "provision":
            return (
                Step("create_database", "Creating your graph's database", self._create_database),
                # Nothing left to do for a database taken whole from the warm pool.
                Step(
                    "create_role",
                    "Creating your graph's login role",
                    self._create_roles,
                    self._not_taken_whole,
                ),
                Step(
                    "grant_access",
                    "Granting your role sole access",
                    self._grant_access,
                    self._not_taken_whole,
                ),
                Step(
                    "apply_schema",
                    "Creating the nodes and edges tables",
                    self._apply_schema,
                    self._not_taken_whole,
                ),
                Step("verify", "Checking that your graph accepts connections", self._verify),
            )
        if kind == "resize":
            return (
                Step("apply_limits", "Applying your new plan's connection limit", self._resize),
                Step("verify_limits", "Checking your graph's new limits", self._verify_limits),
            )
        if kind == "suspend":
            return (
                Step("revoke_login", "Shutting your graph's login out", self._revoke_login),
                Step("end_sessions", "Closing your open sessions", self._end_sessions),
            )
        if kind == "resume":
            return (
                Step("restore_login", "Letting your graph's login in again", self._restore_login),
                Step("verify_limits", "Checking your graph's limits", self._verify_limits),
            )
        return (
            Step("revoke_access", "Revoking access to your graph", self._revoke_access),
            Step("drop_database", "Deleting your graph's database", self._drop_database),
            Step("drop_role", "Deleting your graph's login role", self._drop_roles),
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

    def _not_taken_whole(self, ctx: StepContext) -> bool:
        return ctx.resource_id not in self._taken_whole

    async def _create_database(self, ctx: StepContext) -> None:
        db = self.database_name(ctx.resource_id)
        limit = connection_limit(ctx.spec.limits, what="graph")
        if self._warm is not None and await self._warm.take(ctx.resource_id, limit):
            self._taken_whole.add(ctx.resource_id)
            return
        async with self._connect(ctx.resource_id) as conn:
            if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", db):
                return
            try:
                # No IF NOT EXISTS and no transaction for CREATE DATABASE: check, then tolerate
                # losing the race to a concurrent attempt (which shows as either error).
                # The admin owns it until grant_access hands it to the owner role.
                async with self._heavy:
                    await conn.execute(
                        f"CREATE DATABASE {quote_ident(db)} CONNECTION LIMIT {limit}"
                    )
            except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
                logger.info("database of graph %s already existed", ctx.resource_id)

    async def _create_roles(self, ctx: StepContext) -> None:
        if ctx.resource_id in self._taken_whole:
            return
        async with self._connect(ctx.resource_id) as conn:
            if await self.create_roles(conn, ctx.resource_id, login=True):
                # Nobody learns this password: the customer gets one from rotate_credentials.
                await set_password(conn, self.role_name(ctx.resource_id), new_password())

    async def create_roles(self, conn: asyncpg.Connection, graph_id: str, *, login: bool) -> bool:
        """The graph's owner role and its login role (``NOLOGIN`` unless ``login``: a warm
        pool's database gets LOGIN when a customer takes it), unless they exist; answers
        whether the login role was created by this call."""
        owner, role = self.owner_name(graph_id), self.role_name(graph_id)
        await _create_role(conn, owner, "NOLOGIN")
        created = await _create_role(conn, role, "LOGIN" if login else "NOLOGIN")
        if not await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
            # A CREATEROLE admin must be a member to hand the database to the owner and
            # to create the tables as the customer's role (SET ROLE).
            await conn.execute(f"GRANT {quote_ident(owner)}, {quote_ident(role)} TO CURRENT_USER")
        return created

    async def _grant_access(self, ctx: StepContext) -> None:
        """Redone whole on every attempt, so it also confines a graph made by older code
        (whose login role owned its database)."""
        if ctx.resource_id in self._taken_whole:
            return
        limit = connection_limit(ctx.spec.limits, what="graph")
        async with self._connect(ctx.resource_id) as conn:
            await self.grant_database(conn, ctx.resource_id, limit)

    async def grant_database(self, conn: asyncpg.Connection, graph_id: str, limit: int) -> None:
        """The database to its owner role, CONNECT and TEMPORARY to the login only, and
        ``limit`` on both (one transaction, one round trip)."""
        # Statements sent together in one query run as one transaction (or within the
        # caller's): a round trip instead of six, which a burst of provisions waits on.
        await conn.execute(";\n".join(self.grant_statements(graph_id, limit)))

    def grant_statements(self, graph_id: str, limit: int) -> list[str]:
        """What ``grant_database`` runs, for a caller that sends more with it."""
        db = quote_ident(self.database_name(graph_id))
        owner = quote_ident(self.owner_name(graph_id))
        role = quote_ident(self.role_name(graph_id))
        return [
            f"REVOKE ALL ON DATABASE {db} FROM PUBLIC",
            f"ALTER DATABASE {db} OWNER TO {owner}",
            f"ALTER DATABASE {db} CONNECTION LIMIT {limit}",
            # CREATE on the database (new schemas) is not the customer's: its schema is public.
            f"REVOKE ALL ON DATABASE {db} FROM {role}",
            f"GRANT CONNECT, TEMPORARY ON DATABASE {db} TO {role}",
            # The database's limit counts every role's sessions; the role's counts the
            # customer's on any database. Both hold the plan's number. (Its other attributes
            # were set by CREATE ROLE; naming SUPERUSER or REPLICATION here would need them.)
            f"ALTER ROLE {role} CONNECTION LIMIT {limit}",
        ]

    @staticmethod
    async def grant_schema(conn: asyncpg.Connection, role: str) -> None:
        # Before PostgreSQL 15 every role may create in public; only the owner may now, and
        # the owner is not the customer's role: it gets CREATE by name.
        await conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        await conn.execute(f"GRANT USAGE, CREATE ON SCHEMA public TO {quote_ident(role)}")

    async def _apply_schema(self, ctx: StepContext) -> None:
        if ctx.resource_id in self._taken_whole:
            return
        db, role = self.database_name(ctx.resource_id), self.role_name(ctx.resource_id)
        async with self._connect(ctx.resource_id, database=db) as conn, conn.transaction():
            await self.grant_schema(conn, role)
            await conn.execute(f"SET LOCAL ROLE {quote_ident(role)}")
            await conn.execute(GRAPH_SCHEMA)

    async def confine(self, graph_id: str, limits: Mapping[str, int]) -> None:
        """Applies again what confines a live graph's login (owner role, grants, connection
        limits), for a graph provisioned before the owner role existed or changed by hand.
        Idempotent; ``ResourceNotFound`` when the graph has no database or login role."""
        db, role = self.database_name(graph_id), self.role_name(graph_id)
        limit = connection_limit(limits, what="graph")
        async with self._connect(graph_id, suffix=":confine") as conn:
            found = await conn.fetchval(
                "SELECT count(*) FROM pg_database d, pg_roles r"
                " WHERE d.datname = $1 AND r.rolname = $2",
                db,
                role,
            )
            if not found:
                raise ResourceNotFound(f"graph {graph_id} has no database or login role")
            await _create_role(conn, self.owner_name(graph_id), "NOLOGIN")
            await self.grant_database(conn, graph_id, limit)
        async with self._connect(graph_id, database=db, suffix=":confine") as conn:
            await self.grant_schema(conn, role)

    async def _verify(self, ctx: StepContext) -> None:
        taken_whole = ctx.resource_id in self._taken_whole
        self._taken_whole.discard(ctx.resource_id)  # the steps that skip are behind it
        limit = connection_limit(ctx.spec.limits, what="graph")
        async with self._connect(ctx.resource_id) as admin:
            if not taken_whole:
                # One admin connection for the new password and the checks after the login's
                # test: a connection is a fork on the server and most of a provision's cost.
                credentials = await self._rotate(admin, ctx.resource_id)
                await self.check_login(
                    credentials.database,
                    credentials.user,
                    credentials.password,
                    tag=f"lookout:{ctx.resource_id}",
                )
            # A database taken whole from the warm pool had its login tested when the pool
            # made it (WarmPool: the same connection and test edge, as that login under its
            # spare name); what the claim changed since (names, LOGIN, limit, grants) is in
            # the catalog, checked here. No password is set: nobody would learn it (the
            # customer gets one from rotate_credentials), and a login connection (a fork and
            # an authentication on the server, two PBKDF2 here) was a quarter of PostgreSQL's
            # CPU per pooled provision (bench.billing, perf).
            await self._check_private(admin, ctx.resource_id, limit)

    async def check_login(self, database: str, user: str, password: str, *, tag: str) -> None:
        """Logs in to a graph's ``database`` as its login ``user`` and writes a test edge,
        rolled back; raises ``ProvisioningError`` when the database does not take it."""
        async with admin_connection(
            self._dsn,
            tag=tag,
            database=database,
            user=user,
            password=password,
            connect_timeout=self._timeout,
        ) as conn:
            tx = conn.transaction()
            await tx.start()
            try:
                if await conn.fetchval(_VERIFY) is None:
                    raise ProvisioningError("Your graph's database did not accept a test edge.")
            finally:
                await tx.rollback()

    async def _check_private(self, admin: asyncpg.Connection, graph_id: str, limit: int) -> None:
        """The database is owned by the owner role, PUBLIC may not connect, the login may
        (and log in), within ``limit`` on both, and holds no power over the server."""
        found = await admin.fetchrow(
            "SELECT has_database_privilege('public', d.oid, 'CONNECT') AS public_connect,"
            " has_database_privilege(r.oid, d.oid, 'CONNECT') AS login_connect,"
            " pg_get_userbyid(d.datdba) = $2 AS owned, d.datconnlimit, r.rolconnlimit,"
            " r.rolcanlogin, r.rolcreaterole, r.rolcreatedb, r.rolsuper"
            " FROM pg_database d, pg_roles r WHERE d.datname = $1 AND r.rolname = $3",
            self.database_name(graph_id),
            self.owner_name(graph_id),
            self.role_name(graph_id),
        )
        if (
            found is None
            or found["public_connect"]
            or not found["login_connect"]
            or not found["owned"]
            or found["datconnlimit"] != limit
            or found["rolconnlimit"] != limit
            or not found["rolcanlogin"]
            or found["rolcreaterole"]
            or found["rolcreatedb"]
            or found["rolsuper"]
        ):
            raise ProvisioningError("Your graph's database could not be made private.")

    # -- changes of a live graph (issue 13) ------------------------------------------------
    async def _existing(self, conn: asyncpg.Connection, graph_id: str) -> None:
        found = await conn.fetchval(
            "SELECT count(*) FROM pg_database d, pg_roles r"
            " WHERE d.datname = $1 AND r.rolname = $2",
            self.database_name(graph_id),
            self.role_name(graph_id),
        )
        if not found:
            raise ProvisioningError("Your graph's database or login could not be found.")

    async def _resize(self, ctx: StepContext) -> None:
        """The new plan's limit on the role and the database, with every grant re-applied.
        A smaller limit does not end sessions already open (billing refuses a downgrade that
        does not fit them); it refuses new ones past it."""
        limit = connection_limit(ctx.spec.limits, what="graph")
        async with self._connect(ctx.resource_id, suffix=":resize") as conn:
            await self._existing(conn, ctx.resource_id)
            await self.grant_database(conn, ctx.resource_id, limit)

    async def _verify_limits(self, ctx: StepContext) -> None:
        limit = connection_limit(ctx.spec.limits, what="graph")
        async with self._connect(ctx.resource_id, suffix=":resize") as conn:
            found = await conn.fetchrow(
                "SELECT d.datconnlimit, r.rolconnlimit, r.rolcanlogin"
                " FROM pg_database d, pg_roles r WHERE d.datname = $1 AND r.rolname = $2",
                self.database_name(ctx.resource_id),
                self.role_name(ctx.resource_id),
            )
        if found is None or (found["datconnlimit"], found["rolconnlimit"]) != (limit, limit):
            raise ProvisioningError("Your plan's connection limit could not be set.")
        if ctx.kind == "resume" and not found["rolcanlogin"]:
            raise ProvisioningError("Your graph's login could not be let in again.")

    async def _revoke_login(self, ctx: StepContext) -> None:
        """NOLOGIN keeps the role, its password and its tables: resuming only lifts it."""
        async with self._connect(ctx.resource_id, suffix=":suspend") as conn:
            await self._existing(conn, ctx.resource_id)
            await conn.execute(f"ALTER ROLE {quote_ident(self.role_name(ctx.resource_id))} NOLOGIN")

    async def _end_sessions(self, ctx: StepContext) -> None:
        async with self._connect(ctx.resource_id, suffix=":suspend") as conn:
            await terminate_sessions(conn, role=self.role_name(ctx.resource_id))

    async def _restore_login(self, ctx: StepContext) -> None:
        limit = connection_limit(ctx.spec.limits, what="graph")
        async with self._connect(ctx.resource_id, suffix=":resume") as conn:
            await self._existing(conn, ctx.resource_id)
            await conn.execute(f"ALTER ROLE {quote_ident(self.role_name(ctx.resource_id))} LOGIN")
            # The plan may have changed while it was suspended; the grants converge as well.
            await self.grant_database(conn, ctx.resource_id, limit)

    async def open_connections(self, resource_id: str) -> int:
        """Sessions of the graph's login now (``provisioning.ConnectionMeter``)."""
        async with self._connect(resource_id, suffix=":usage") as conn:
            count: int = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
                self.role_name(resource_id),
            )
        return count

    async def _revoke_access(self, ctx: StepContext) -> None:
        role = self.role_name(ctx.resource_id)
        async with self._connect(ctx.resource_id) as conn:
            if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                # NOLOGIN shuts it out of every database; a graph made by older code has its
                # role as the database's owner, which keeps CONNECT whatever is revoked.
                await conn.execute(f"ALTER ROLE {quote_ident(role)} NOLOGIN")
            await terminate_sessions(conn, role=role, database=self.database_name(ctx.resource_id))

    async def _drop_database(self, ctx: StepContext) -> None:
        db = self.database_name(ctx.resource_id)
        async with self._connect(ctx.resource_id, suffix=":drop") as conn:
            await terminate_sessions(conn, tag=f"lookout:{ctx.resource_id}", database=db)
            async with self._heavy:
                await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(db)} WITH (FORCE)")

    async def _drop_roles(self, ctx: StepContext) -> None:
        role = self.role_name(ctx.resource_id)
        async with self._connect(ctx.resource_id, suffix=":drop") as conn:
            await terminate_sessions(conn, role=role)
            await conn.execute(f"DROP ROLE IF EXISTS {quote_ident(role)}")
            # Owns nothing once the database is gone (drop_database comes first).
            await conn.execute(
                f"DROP ROLE IF EXISTS {quote_ident(self.owner_name(ctx.resource_id))}"
            )

    async def teardown(self, resource_id: str) -> None:
        self._taken_whole.discard(resource_id)
        db, role = self.database_name(resource_id), self.role_name(resource_id)
        async with self._connect(resource_id, suffix=":teardown") as conn:
            await terminate_sessions(conn, tag=f"lookout:{resource_id}", database=db, role=role)
            async with self._heavy:
                await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(db)} WITH (FORCE)")
            await conn.execute(f"DROP ROLE IF EXISTS {quote_ident(role)}")
            await conn.execute(f"DROP ROLE IF EXISTS {quote_ident(self.owner_name(resource_id))}")

    async def storage_bytes(self) -> dict[str, int]:
        """``pg_database_size`` of every graph database on this server (the admin may read
        them all). Sizes are measured, not capped: PostgreSQL has no per-database quota."""
        pattern = self._prefix.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%")
        async with self._connect("storage", suffix=":size") as conn:
            rows = await conn.fetch(
                "SELECT datname, pg_database_size(oid) AS size FROM pg_database"
                " WHERE datname LIKE $1 || 'gr\\_%'",
                pattern,
            )
        prefix_len = len(self._prefix)
        # NULL: dropped while being measured.
        return {
            r["datname"][prefix_len:]: int(r["size"])
            for r in rows
            if r["size"] is not None and _is_resource_id(r["datname"][prefix_len:])
        }

    async def rotate_credentials(self, resource_id: str) -> Credentials:
        async with self._connect(resource_id, suffix=":credentials") as conn:
            return await self._rotate(conn, resource_id)

    async def _rotate(self, conn: asyncpg.Connection, resource_id: str) -> Credentials:
        db, role = self.database_name(resource_id), self.role_name(resource_id)
        password = new_password()
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


def _is_resource_id(text: str) -> bool:
    try:
        validate_resource_id(text)
    except ValueError:
        return False
    return True


async def _create_role(conn: asyncpg.Connection, name: str, login: str) -> bool:
    """Creates the role unless it exists; answers whether this call created it."""
    if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", name):
        return False
    try:
        await conn.execute(
            f"CREATE ROLE {quote_ident(name)} {login} NOSUPERUSER NOCREATEDB NOCREATEROLE"
            " NOREPLICATION NOBYPASSRLS"
        )
    except (asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError):
        return False
    return True
