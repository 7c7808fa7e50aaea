"""Small tools for administering the provisioner's PostgreSQL server."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import anyio
import anyio.to_thread
import asyncpg

from .errors import DATABASE_ERRORS, ProvisioningError

__all__ = [
    "AdminConnections",
    "admin_connection",
    "connection_limit",
    "credentials_dsn",
    "new_password",
    "quote_ident",
    "reusing_connections",
    "scram_sha256_verifier",
    "set_password",
    "terminate_sessions",
    "validate_resource_id",
]

_RESOURCE_ID = re.compile(r"^[a-z]{2,8}_[0-9a-f]{24}$")
_SCRAM_ITERATIONS = 4096  # PostgreSQL's own default (scram_iterations)


def validate_resource_id(resource_id: str) -> str:
    """Resource ids become database and role names: accept only the shape ids are made in."""
    if not _RESOURCE_ID.match(resource_id):
        raise ValueError(f"resource id {resource_id!r} is not of the form <prefix>_<24 hex digits>")
    return resource_id


def connection_limit(limits: Mapping[str, int], *, what: str) -> int:
    """The plan's ``max_connections`` as a ``CONNECTION LIMIT`` (-1: none given)."""
    limit = limits.get("max_connections", -1)
    if limit == 0 or limit < -1:
        raise ProvisioningError(
            f"Your plan allows no database connections, so no {what} can be created for it."
        )
    return limit


def quote_ident(name: str) -> str:
    """An SQL identifier, for statements (CREATE DATABASE, GRANT...) that take no parameters."""
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def new_password() -> str:
    return secrets.token_urlsafe(24)


def scram_sha256_verifier(password: str, *, salt: bytes | None = None) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802, RFC 7677).

    Sending the verifier instead of the password keeps the password out of the server's
    statement log, as psql's ``\\password`` does.
    """
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, _SCRAM_ITERATIONS)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${_SCRAM_ITERATIONS}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


async def set_password(conn: asyncpg.Connection, role: str, password: str) -> None:
    # 4096 rounds of PBKDF2 take milliseconds of CPU: in a thread (hashlib lets go of the GIL),
    # not on the event loop that acknowledges webhooks, during a burst of provisions.
    verifier = await anyio.to_thread.run_sync(scram_sha256_verifier, password)
    await conn.execute(f"ALTER ROLE {quote_ident(role)} PASSWORD {_quote_literal(verifier)}")


def credentials_dsn(admin_dsn: str, *, database: str, user: str, password: str) -> str:
    """The admin DSN's server, with another database, user and password."""
    parts = urlsplit(admin_dsn)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    query = [
        (k, v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if k not in {"user", "password", "dbname", "database", "passfile"}
    ]
    return urlunsplit((parts.scheme, netloc, "/" + quote(database), urlencode(query), ""))


@dataclass(eq=False)
class _Kept:
    conn: asyncpg.Connection
    tag: str
    busy: bool = False


@dataclass(eq=False)
class _Idle:
    conn: asyncpg.Connection
    tag: str
    since: float


class AdminConnections:
    """Admin connections to each server's default database, kept open between operations:
    ``reusing_connections(keeper)`` starts from one of them and gives its connections back
    at its end. A connection is a fork, an authentication and an exit on the server, and DSN
    parsing and a handshake here: with one per operation, those were a third of PostgreSQL's
    CPU in a burst of pooled provisions (bench.billing, perf). At most ``max_idle`` per server
    are kept (one per operation running at once is enough); one idle for ``idle_seconds`` is
    closed by ``prune``. Only a connection its operation left clean comes back (no error, no
    cancellation, no open transaction, still open): the same rules as within one operation.
    """

    def __init__(self, *, max_idle: int = 16, idle_seconds: float = 30.0) -> None:
        if max_idle < 0:
            raise ValueError("AdminConnections keeps 0 or more connections")
        self._max_idle = max_idle
        self._idle_seconds = idle_seconds
        self._idle: dict[str, list[_Idle]] = {}

    def idle(self, dsn: str) -> int:
        """Connections to ``dsn`` kept open now."""
        return len(self._idle.get(dsn, ()))

    def _take(self, dsn: str) -> _Kept | None:
        """The most recently used open connection to ``dsn``, if any (a server may have
        ended one meanwhile: those are dropped)."""
        idle = self._idle.get(dsn, [])
        while idle:
            entry = idle.pop()
            if not entry.conn.is_closed():
                return _Kept(entry.conn, entry.tag)
        return None

    async def _give_back(self, dsn: str, kept: _Kept, close_timeout: float) -> None:
        idle = self._idle.setdefault(dsn, [])
        if len(idle) >= self._max_idle or kept.conn.is_closed():
            await _close(kept.conn, close_timeout)
            return
        idle.append(_Idle(kept.conn, kept.tag, time.monotonic()))

    async def prune(self, *, close_timeout: float = 5.0) -> int:
        """Closes the connections idle for ``idle_seconds``; answers how many."""
        cutoff = time.monotonic() - self._idle_seconds
        stale = [e for idle in self._idle.values() for e in idle if e.since < cutoff]
        for dsn, idle in self._idle.items():
            self._idle[dsn] = [e for e in idle if e.since >= cutoff]
        for entry in stale:
            await _close(entry.conn, close_timeout)
        return len(stale)

    async def close(self, *, close_timeout: float = 5.0) -> None:
        """Closes every connection kept (at shutdown)."""
        entries = [e for idle in self._idle.values() for e in idle]
        self._idle.clear()
        for entry in entries:
            await _close(entry.conn, close_timeout)


@dataclass(eq=False)
class _Scope:
    kept: dict[str, _Kept]
    keeper: AdminConnections | None


# The admin connections kept open by ``reusing_connections`` in this task, by DSN.
_scope: ContextVar[_Scope | None] = ContextVar("lookout_admin_connections", default=None)


@asynccontextmanager
async def reusing_connections(
    keeper: AdminConnections | None = None, *, close_timeout: float = 5.0
) -> AsyncIterator[None]:
    """Within the block, ``admin_connection`` keeps its connections to a server's default
    database (no ``database``, ``user`` or ``password`` given) open between uses, one per
    server, and closes them at the end: one operation's steps share one where each opened its
    own. A connection is a fork and a start-up on the server and DSN parsing and a handshake
    here: four of them were most of a pooled provision's CPU on both sides. One left in a
    transaction, or by an error or a cancellation, is closed at once, never reused. With a
    ``keeper``, the first use takes a connection it kept, and the block's connections go back
    to it at the end instead of being closed."""
    scope = _Scope({}, keeper)
    token = _scope.set(scope)
    try:
        yield
    except BaseException:
        # Cancelled (shutting down, the operation cancelled) or failed: nothing is waited for.
        for entry in scope.kept.values():
            entry.conn.terminate()
        raise
    else:
        for dsn, entry in scope.kept.items():
            if keeper is not None and not entry.busy and not entry.conn.is_in_transaction():
                await keeper._give_back(dsn, entry, close_timeout)
            else:
                await _close(entry.conn, close_timeout)
    finally:
        _scope.reset(token)


async def _close(conn: asyncpg.Connection, within: float) -> None:
    # asyncpg aborts the connection itself when closing fails; the steps' outcome stands.
    with contextlib.suppress(*DATABASE_ERRORS):
        await conn.close(timeout=within)


@asynccontextmanager
async def admin_connection(
    dsn: str,
    *,
    tag: str,
    database: str | None = None,
    user: str | None = None,
    password: str | None = None,
    connect_timeout: float = 10.0,
) -> AsyncIterator[asyncpg.Connection]:
    """A connection whose ``application_name`` is ``tag``, so teardown can find and stop it
    (kept open for the next use inside ``reusing_connections``)."""
    tag = tag[:63]
    scope = _scope.get() if database is None and user is None and password is None else None
    kept = scope.kept if scope is not None else None
    entry = kept.get(dsn) if kept is not None else None
    if entry is not None and (entry.busy or entry.conn.is_closed()):
        if not entry.busy:
            assert kept is not None
            del kept[dsn]
        entry = None
    if entry is None and kept is not None and dsn not in kept and scope is not None:
        entry = await _take_kept(scope, dsn, tag, connect_timeout)
    if entry is None:
        conn = await asyncpg.connect(
            dsn,
            database=database,
            user=user,
            password=password,
            timeout=connect_timeout,
            server_settings={"application_name": tag},
        )
        if kept is not None and dsn not in kept:
            entry = kept[dsn] = _Kept(conn, tag)
    else:
        conn = entry.conn
    if entry is None:
        try:
            yield conn
        finally:
            await conn.close(timeout=connect_timeout)
        return
    entry.busy = True
    reusable = False
    try:
        if entry.tag != tag:
            await conn.execute("SELECT set_config('application_name', $1, false)", tag)
            entry.tag = tag
        yield conn
        reusable = not conn.is_in_transaction()
    finally:
        entry.busy = False
        if not reusable:
            assert kept is not None
            if kept.get(dsn) is entry:
                del kept[dsn]
            # Cancelled or failed mid-statement perhaps: nothing is waited for.
            conn.terminate()


async def _take_kept(scope: _Scope, dsn: str, tag: str, within: float) -> _Kept | None:
    """A connection the scope's keeper kept, tagged ``tag``; None when it has none that
    answers ``within`` seconds, as a new connection would (the server may have ended one while
    it was idle, or a network gone quiet may hold it: another is connected)."""
    while scope.keeper is not None and (taken := scope.keeper._take(dsn)) is not None:
        try:
            if taken.tag != tag:
                await taken.conn.execute(
                    "SELECT set_config('application_name', $1, false)", tag, timeout=within
                )
                taken.tag = tag
        except DATABASE_ERRORS:
            taken.conn.terminate()
            continue
        scope.kept[dsn] = taken
        return taken
    return None


async def terminate_sessions(
    conn: asyncpg.Connection,
    *,
    tag: str | None = None,
    database: str | None = None,
    role: str | None = None,
) -> int:
    """Ends (and waits for) sessions with this application name, on this database or as this role.

    A step cancelled mid-statement may leave its server session running (a CREATE DATABASE
    that still commits): teardown stops those first.
    """
    rows = await conn.fetch(
        "SELECT pg_terminate_backend(pid, 5000) AS done FROM pg_stat_activity"
        " WHERE pid <> pg_backend_pid()"
        " AND (application_name = $1 OR datname = $2 OR usename = $3)",
        tag,
        database,
        role,
    )
    return len(rows)
