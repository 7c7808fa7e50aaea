"""The warm pool: graph databases made ahead of demand, so that a paid graph is ready at once.

``CREATE DATABASE`` and the schema were most of a provision's time, and the reason at most a
few run at once (they flood PostgreSQL's WAL). Each provisioning server keeps ``size``
databases ready (``LOOKOUT_WARM_POOL_SIZE``), each a copy of the graph template (a database
holding ``GRAPH_SCHEMA``, never connected to), with its owner role and its login role
(``NOLOGIN``), grants made and the tables owned by the login: everything of a graph but its
name, its limit and the right to log in.

- *Taking* (``take``, from a provision's ``create_database`` step): one statement claims the
  oldest ready row of the server (``FOR UPDATE SKIP LOCKED``: two provisions never get the
  same one), then one transaction on the server renames the database and both roles to the
  graph's, lets the login in and applies the plan's limit with the grants of
  ``GraphBackend.grant_database``. No ``CREATE DATABASE`` on that path. An empty pool answers
  False at once and the step creates the database as before: a provision never fails for it.
- *Refilling* (``run``, a loop under the app's supervisor): up to ``size`` per server, one at a
  time, each after giving way to the webhook intake and to the operations running in this
  process (``Foreground``): it is throughput work customers do not wait on. Instances share the
  count (an advisory lock per server around counting and reserving a row), so several never
  overfill.
- *Sweeping* (each round of the loop): a database a crash left half-made (its row still
  ``creating`` and its instance gone, or ``stale_after`` old) is dropped and made again; so are
  one whose row was taken but never renamed (its provision finished otherwise), a surplus
  over ``size``, and a row whose database is gone from the server.

Deprovisioning gives nothing back: a customer's database is dropped, never reused.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Final
from urllib.parse import parse_qsl, urlsplit

import anyio
import asyncpg

from .errors import DATABASE_ERRORS
from .foreground import Foreground, give_way
from .graph import GRAPH_SCHEMA, GraphBackend
from .leases import INSTANCE_LOCK_CLASS, instance_gone
from .operations import Connection
from .pgadmin import admin_connection, new_password, quote_ident, set_password

__all__ = ["WARM_POOL_LOCK_CLASS", "WarmPool", "server_key", "template_name", "warm_pool_counts"]

logger = logging.getLogger(__name__)

# The first key of the advisory locks around a server's pool count, in Lookout's database, and
# around the making of a template, on the provisioning server; apart from INSTANCE_LOCK_CLASS.
WARM_POOL_LOCK_CLASS: Final = 0x4C6B5750
ID_PREFIX: Final = "wp"
# The template's name carries a digest of the schema: a new schema makes a new template, and
# the databases copied from an older one are not mixed with it.
TEMPLATE_DIGEST: Final = hashlib.sha256(GRAPH_SCHEMA.encode()).hexdigest()[:12]

_CLAIM = """
WITH mine AS (
    SELECT id FROM warm_pool WHERE claimed_by = $2
), picked AS (
    SELECT id FROM warm_pool
    WHERE server = $1 AND state = 'ready' AND template = $3 AND NOT EXISTS (SELECT 1 FROM mine)
    ORDER BY ready_at LIMIT 1
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE warm_pool w SET state = 'claimed', claimed_by = $2, claimed_at = now()
    FROM picked WHERE w.id = picked.id
    RETURNING w.id
)
SELECT id FROM mine UNION ALL SELECT id FROM claimed
"""


def _held(server_param: int) -> str:
    """SQL: how many databases a server's pool holds or is making."""
    return (
        "SELECT count(*) FROM warm_pool"
        f" WHERE server = ${server_param} AND state IN ('creating', 'ready')"
    )


# Rows to remove, each turned `dropping` and held by this instance while it removes them.
# $1 server, $2 this instance, $3 INSTANCE_LOCK_CLASS, $4 stale_after (s), $5 size,
# $6 claimed_kept (s), $7 the current template.
_TO_DROP = f"""
WITH doomed AS (
    SELECT id FROM warm_pool w
    WHERE server = $1 AND (
        -- half-made by an instance that died, or that is stuck
        (state IN ('creating', 'dropping')
         AND ({instance_gone("created_by", 3)}
              OR created_at < now() - make_interval(secs => $4::float8)))
        -- this instance's own removals that did not finish
        OR (state = 'dropping' AND created_by = $2)
        -- taken by a provision that has finished: renamed (nothing is left) or not
        OR (state = 'claimed' AND claimed_at < now() - make_interval(secs => $6::float8)
            AND NOT EXISTS (SELECT 1 FROM operations o
                            WHERE o.resource_id = w.claimed_by AND o.finished_at IS NULL))
        -- copied from an older template (the schema changed since)
        OR (state = 'ready' AND template <> $7)
        -- more than the pool's size (it was made smaller)
        OR id IN (SELECT id FROM warm_pool WHERE server = $1 AND state = 'ready'
                  ORDER BY ready_at DESC OFFSET $5)
    )
    FOR UPDATE SKIP LOCKED
)
UPDATE warm_pool w SET state = 'dropping', claimed_by = NULL, claimed_at = NULL,
    created_by = $2, created_at = now()
FROM doomed WHERE w.id = doomed.id
RETURNING w.id
"""


def template_name(name_prefix: str) -> str:
    """The graph template's database name on a server, for a backend's name prefix."""
    return f"{name_prefix}graph_template_{TEMPLATE_DIGEST}"


def server_key(admin_dsn: str) -> str:
    """The provisioning server as pool rows name it: ``host:port`` of its admin DSN (no user,
    no password), a socket directory for a Unix socket."""
    parts = urlsplit(admin_dsn)
    query = dict(parse_qsl(parts.query))
    host = query.get("host") or parts.hostname or "localhost"
    port = query.get("port") or parts.port or 5432
    return f"{host}:{port}"


async def warm_pool_counts(conn: Connection) -> dict[tuple[str, str], int]:
    """Databases of the pool by (server, state), for ``ready`` (the pool's level) and
    ``creating`` (being made now)."""
    rows = await conn.fetch(
        "SELECT server, state, count(*) AS n FROM warm_pool"
        " WHERE state IN ('ready', 'creating') GROUP BY server, state"
    )
    return {(r["server"], r["state"]): r["n"] for r in rows}


class WarmPool:
    """The warm pool of ``backend``'s server (``WarmSource``): ``backend.use_warm_pool(pool)``
    makes provisions take from it, ``run`` keeps it filled to ``size``."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        backend: GraphBackend,
        *,
        size: int,
        instance_id: str,
        server: str | None = None,
        give_way_to: Sequence[Foreground] = (),
        give_way_seconds: float = 5.0,
        interval: float = 10.0,
        stale_after: float = 600.0,
        claimed_kept: float = 600.0,
    ) -> None:
        if size < 0:
            raise ValueError("WarmPool size must be 0 or more")
        self._pool = pool
        self._backend = backend
        self._size = size
        self._instance_id = instance_id
        self._server = server if server is not None else server_key(backend.admin_dsn)
        self._give_way_to = tuple(give_way_to)
        self._give_way_seconds = give_way_seconds
        self._interval = interval
        self._stale_after = stale_after
        self._claimed_kept = claimed_kept
        self._template = template_name(backend.name_prefix)
        self._template_ready = False
        self._wanted = anyio.Event()

    @property
    def server(self) -> str:
        return self._server

    @property
    def size(self) -> int:
        return self._size

    @property
    def template(self) -> str:
        """The name of the template database on the server."""
        return self._template

    async def level(self) -> int:
        """Databases ready to be taken now."""
        async with self._pool.acquire() as conn:
            count: int = await conn.fetchval(
                "SELECT count(*) FROM warm_pool WHERE server = $1 AND state = 'ready'",
                self._server,
            )
        return count

    # -- taking ----------------------------------------------------------------------------
    async def take(self, graph_id: str, limit: int) -> bool:
        """See ``WarmSource.take``. Idempotent: a provision that takes again after a crash
        finds the database it claimed."""
        async with self._pool.acquire() as conn:
            spare: str | None = await conn.fetchval(_CLAIM, self._server, graph_id, self._template)
        self._wanted.set()  # one fewer (or none left): the loop makes more
        if spare is None:
            return False
        return await self._adopt(spare, graph_id, limit)

    async def _adopt(self, spare: str, graph_id: str, limit: int) -> bool:
        b = self._backend
        src, dst = b.database_name(spare), b.database_name(graph_id)
        async with self._admin(graph_id) as conn:
            found = {
                r["datname"]
                for r in await conn.fetch(
                    "SELECT datname FROM pg_database WHERE datname = ANY($1::text[])", [src, dst]
                )
            }
            if src not in found:
                # Renamed by an earlier attempt of this step (then the next steps find all in
                # place), or lost: the step makes what is missing.
                return False
            if dst not in found:
                # One query, so one transaction and one round trip.
                statements = [
                    f"ALTER DATABASE {quote_ident(src)} RENAME TO {quote_ident(dst)}",
                    *(
                        f"ALTER ROLE {quote_ident(old)} RENAME TO {quote_ident(new)}"
                        for old, new in (
                            (b.owner_name(spare), b.owner_name(graph_id)),
                            (b.role_name(spare), b.role_name(graph_id)),
                        )
                    ),
                    f"ALTER ROLE {quote_ident(b.role_name(graph_id))} LOGIN",
                    *b.grant_statements(graph_id, limit),
                ]
                try:
                    await conn.execute(";\n".join(statements))
                except (asyncpg.DuplicateObjectError, asyncpg.UndefinedObjectError) as exc:
                    # A role of the graph's name exists already, or the spare lacks one.
                    logger.warning(
                        "warm database %s not given to %s (%s); it is dropped",
                        spare,
                        graph_id,
                        type(exc).__name__,
                    )
                    await self._set_state(spare, "dropping")
                    return False
                return True
        # The graph's database exists already (an earlier attempt created it, the pool being
        # empty then): the spare goes back to the pool untouched.
        await self._set_state(spare, "ready")
        return False

    async def _set_state(self, spare: str, state: str) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(
                "UPDATE warm_pool SET state = $2, claimed_by = NULL, claimed_at = NULL,"
                " created_by = $3 WHERE id = $1",
                spare,
                state,
                self._instance_id,
            )

    # -- the loop: sweep, then refill -------------------------------------------------------
    async def run(self) -> None:
        """Sweeps and refills at once, after every take, and every ``interval`` seconds."""
        while True:
            self._wanted = anyio.Event()
            try:
                await self.sweep()
                await self.fill()
            except DATABASE_ERRORS as exc:
                # A server is away: the next round tries again. Anything else is a bug, for the
                # supervisor to log with its traceback.
                logger.warning(
                    "warm pool of %s not refilled (%s: %s); next try in %.0f s",
                    self._server,
                    type(exc).__name__,
                    exc,
                    self._interval,
                )
            with anyio.move_on_after(self._interval):
                await self._wanted.wait()

    async def fill(self) -> int:
        """Makes databases until the server's pool holds ``size`` (counting those being made
        by any instance); answers how many this call made."""
        made = 0
        while await self._room():
            for foreground in self._give_way_to:
                await give_way(foreground, at_most=self._give_way_seconds)
            spare = await self._reserve()
            if spare is None:
                break
            await self._make(spare)
            made += 1
        return made

    async def _room(self) -> bool:
        """Whether the pool lacks a database, before giving way (without the lock)."""
        if self._size == 0:
            return False
        async with self._pool.acquire() as conn:
            count: int = await conn.fetchval(_held(1), self._server)
        return count < self._size

    async def _reserve(self) -> str | None:
        """A row for one more database, unless the server's pool is full."""
        spare = f"{ID_PREFIX}_{secrets.token_hex(12)}"
        async with self._pool.acquire() as conn, conn.transaction():
            # Counted and inserted under one lock per server: instances never overfill.
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))", WARM_POOL_LOCK_CLASS, self._server
            )
            reserved: str | None = await conn.fetchval(
                "INSERT INTO warm_pool (id, server, template, created_by) SELECT $1, $2, $3, $4"
                f" WHERE ({_held(2)}) < $5 RETURNING id",
                spare,
                self._server,
                self._template,
                self._instance_id,
                self._size,
            )
        return reserved

    async def _make(self, spare: str) -> None:
        try:
            await self._ensure_template()
            await self._create(spare)
        except BaseException:
            # Cancelled (shutting down) or failed: removed now if the servers let us, else by
            # a sweep, which finds the row `dropping` (or `creating`, its instance gone).
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                try:
                    await self._set_state(spare, "dropping")
                    await self._drop([spare])
                except DATABASE_ERRORS as exc:
                    logger.warning("half-made warm database %s left to the sweep (%r)", spare, exc)
            raise
        async with self._pool.acquire() as conn:
            ready = await conn.fetchval(
                "UPDATE warm_pool SET state = 'ready', ready_at = now()"
                " WHERE id = $1 AND state = 'creating' AND created_by = $2 RETURNING true",
                spare,
                self._instance_id,
            )
        if not ready:
            logger.warning("warm database %s was swept while it was being made", spare)

    async def _create(self, spare: str) -> None:
        b = self._backend
        db, role = b.database_name(spare), b.role_name(spare)
        async with self._admin(spare) as conn:
            try:
                # Under the same limit as the provisions' own CREATE DATABASE (the WAL's).
                async with b.heavy:
                    await conn.execute(
                        f"CREATE DATABASE {quote_ident(db)} TEMPLATE {quote_ident(self._template)}"
                    )
            except asyncpg.InvalidCatalogNameError:
                self._template_ready = False  # dropped by hand: made again next time
                raise
            await b.create_roles(conn, spare, login=False)
            await b.grant_database(conn, spare, -1)
        async with self._admin(spare, database=db) as conn, conn.transaction():
            # The template's tables are the admin's; a graph's are its login's, which must be
            # allowed to create in the schema first (unless the admin is a superuser).
            await b.grant_schema(conn, role)
            for table in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            ):
                await conn.execute(
                    f"ALTER TABLE public.{quote_ident(table['tablename'])}"
                    f" OWNER TO {quote_ident(role)}"
                )
        await self._test_login(spare)

    async def _test_login(self, spare: str) -> None:
        """The spare's login logs in and writes a test edge now, with a password used once:
        the provision that takes the database checks in the catalog what its claim changes
        (names, LOGIN, limit, grants) and logs in no more (``GraphBackend`` verify). Left
        ``NOLOGIN`` without a password after, as the pool keeps its logins."""
        b = self._backend
        db, role = b.database_name(spare), quote_ident(b.role_name(spare))
        password = new_password()
        async with self._admin(spare) as conn:
            await set_password(conn, b.role_name(spare), password)
            await conn.execute(f"ALTER ROLE {role} LOGIN")
        try:
            await b.check_login(db, b.role_name(spare), password, tag=f"lookout:{spare}")
        finally:
            async with self._admin(spare) as conn:
                await conn.execute(f"ALTER ROLE {role} NOLOGIN PASSWORD NULL")

    async def _ensure_template(self) -> None:
        """The template: a database with the graph schema that nobody may connect to (a copy
        fails while anyone is connected to its source). Made once per server, under an
        advisory lock there; one left half-made (connections still allowed) is completed."""
        if self._template_ready:
            return
        name = self._template
        async with self._admin("warm-pool-template") as conn:
            if await conn.fetchval(
                "SELECT NOT datallowconn FROM pg_database WHERE datname = $1", name
            ):
                self._template_ready = True
                return
            await conn.execute(
                "SELECT pg_advisory_lock($1, hashtext($2))", WARM_POOL_LOCK_CLASS, name
            )
            try:
                allowed = await conn.fetchval(
                    "SELECT datallowconn FROM pg_database WHERE datname = $1", name
                )
                if allowed is None:
                    async with self._backend.heavy:
                        await conn.execute(f"CREATE DATABASE {quote_ident(name)}")
                if allowed is not False:
                    async with (
                        self._admin("warm-pool-template", database=name) as template,
                        template.transaction(),
                    ):
                        await template.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
                        await template.execute(GRAPH_SCHEMA)
                    await conn.execute(f"REVOKE ALL ON DATABASE {quote_ident(name)} FROM PUBLIC")
                    await conn.execute(
                        f"ALTER DATABASE {quote_ident(name)} ALLOW_CONNECTIONS false"
                    )
            finally:
                await conn.execute(
                    "SELECT pg_advisory_unlock($1, hashtext($2))", WARM_POOL_LOCK_CLASS, name
                )
        self._template_ready = True

    # -- sweeping ---------------------------------------------------------------------------
    async def sweep(self) -> int:
        """Removes what must go (see the module's doc) and forgets ready rows whose database
        is gone; answers how many databases' rows were removed."""
        async with self._pool.acquire() as conn:
            doomed = [
                r["id"]
                for r in await conn.fetch(
                    _TO_DROP,
                    self._server,
                    self._instance_id,
                    INSTANCE_LOCK_CLASS,
                    self._stale_after,
                    self._size,
                    self._claimed_kept,
                    self._template,
                )
            ]
            ready = [
                r["id"]
                for r in await conn.fetch(
                    "SELECT id FROM warm_pool WHERE server = $1 AND state = 'ready'", self._server
                )
            ]
        removed = await self._drop(doomed) if doomed else 0
        if ready:
            removed += await self._forget_lost(ready)
        return removed

    async def _drop(self, spares: Sequence[str]) -> int:
        """Drops what is left of these spares on the server, then their rows."""
        b = self._backend
        left = await self._on_server(
            [b.database_name(s) for s in spares],
            [name for s in spares for name in (b.role_name(s), b.owner_name(s))],
        )
        dropped = []
        for spare in spares:
            names = {b.database_name(spare), b.role_name(spare), b.owner_name(spare)}
            if names & left:
                try:
                    await b.teardown(spare)
                except DATABASE_ERRORS as exc:
                    logger.warning("warm database %s not dropped yet (%s)", spare, exc)
                    continue
                logger.info("dropped warm database %s", spare)
            dropped.append(spare)
        async with self._pool.acquire() as conn:
            await conn.execute(
                "DELETE FROM warm_pool WHERE id = ANY($1::text[]) AND state = 'dropping'"
                " AND created_by = $2",
                dropped,
                self._instance_id,
            )
        return len(dropped)

    async def _forget_lost(self, ready: Sequence[str]) -> int:
        """Rows of ready databases that someone dropped on the server: the pool makes others."""
        b = self._backend
        present = await self._on_server([b.database_name(s) for s in ready])
        lost = [s for s in ready if b.database_name(s) not in present]
        if not lost:
            return 0
        async with self._pool.acquire() as conn:
            # Still ready: one taken meanwhile was renamed, not lost.
            forgotten = await conn.fetch(
                "UPDATE warm_pool SET state = 'dropping', created_by = $2, created_at = now()"
                " WHERE id = ANY($1::text[]) AND state = 'ready' RETURNING id",
                lost,
                self._instance_id,
            )
        logger.warning("%d warm databases of %s were gone from the server", len(lost), self._server)
        return await self._drop([r["id"] for r in forgotten]) if forgotten else 0

    async def _on_server(self, databases: Sequence[str], roles: Sequence[str] = ()) -> set[str]:
        """Which of these databases and roles exist on the server."""
        async with self._admin("warm-pool-sweep") as conn:
            rows = await conn.fetch(
                "SELECT datname AS name FROM pg_database WHERE datname = ANY($1::text[])"
                " UNION SELECT rolname FROM pg_roles WHERE rolname = ANY($2::text[])",
                list(databases),
                list(roles),
            )
        return {r["name"] for r in rows}

    def _admin(
        self, tag: str, *, database: str | None = None
    ) -> AbstractAsyncContextManager[asyncpg.Connection]:
        return admin_connection(self._backend.admin_dsn, tag=f"lookout:{tag}", database=database)
