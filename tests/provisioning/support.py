"""What the provisioning tests share: a hooks double, runner lifecycles, event readers."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import anyio
import asyncpg
from redis.asyncio import Redis

from provisioning import (
    OperationRecord,
    OperationRunner,
    ProvisionerBackend,
    RetryPolicy,
    Step,
    StepContext,
    get_operation,
)
from provisioning.backend import Credentials, OperationKind
from provisioning.pgadmin import quote_ident
from streams import EventPublisher, operation_topic, stream_key, user_topic

FAST_RETRY = RetryPolicy(attempts=3, initial_delay=0.01, max_delay=0.05)


@dataclass
class RecordingHooks:
    """A SubscriptionHooks double: records every call, like the app's would write rows."""

    succeeded: list[OperationRecord] = field(default_factory=list)
    failed: list[tuple[OperationRecord, str]] = field(default_factory=list)
    audits: list[tuple[str, str | None, str | None, dict[str, Any]]] = field(default_factory=list)

    # How many calls of provisioning_succeeded fail first, as an app whose database is down.
    succeeded_failures: int = 0
    provision_failed_note: str = "Your order is void."

    async def provisioning_succeeded(self, operation: OperationRecord) -> None:
        if self.succeeded_failures > 0:
            self.succeeded_failures -= 1
            raise ConnectionRefusedError("the app's database is down")
        self.succeeded.append(operation)

    async def provisioning_failed(self, operation: OperationRecord, customer_message: str) -> None:
        self.failed.append((operation, customer_message))

    async def audit(
        self,
        kind: str,
        *,
        subject_id: str | None,
        user_id: str | None,
        detail: Mapping[str, Any],
    ) -> None:
        self.audits.append((kind, subject_id, user_id, dict(detail)))

    def audit_kinds(self, operation_id: str) -> list[str]:
        return [k for k, _, _, d in self.audits if d.get("operation_id") == operation_id]


class WrappedBackend:
    """A real backend's stand-in that passes everything through; subclasses change ``steps``."""

    def __init__(self, inner: ProvisionerBackend) -> None:
        self.inner = inner

    @property
    def resource_type(self) -> str:
        return self.inner.resource_type

    @property
    def id_prefix(self) -> str:
        return self.inner.id_prefix

    def steps(self, kind: OperationKind) -> Sequence[Step]:
        return self.inner.steps(kind)

    async def teardown(self, resource_id: str) -> None:
        await self.inner.teardown(resource_id)

    async def rotate_credentials(self, resource_id: str) -> Credentials:
        return await self.inner.rotate_credentials(resource_id)


class HoldingBackend(WrappedBackend):
    """Wraps a real backend; the step ``hold_at`` runs for real, then waits on ``release``."""

    def __init__(self, inner: ProvisionerBackend, hold_at: str) -> None:
        super().__init__(inner)
        self.hold_at = hold_at
        self.holding = anyio.Event()
        self.release = anyio.Event()
        self.released = False

    def steps(self, kind: OperationKind) -> Sequence[Step]:
        return [self._wrap(s) if s.name == self.hold_at else s for s in self.inner.steps(kind)]

    def _wrap(self, step: Step) -> Step:
        async def run(ctx: StepContext) -> None:
            await step.run(ctx)
            self.holding.set()
            await self.release.wait()
            self.released = True

        return replace(step, run=run)


@asynccontextmanager
async def running(
    pool: asyncpg.Pool,
    publisher: EventPublisher,
    hooks: RecordingHooks,
    backends: Iterable[ProvisionerBackend],
    **options: Any,
) -> AsyncIterator[OperationRunner]:
    """A runner serving in its own task group for the duration of the block."""
    options.setdefault("instance_id", f"test-{secrets.token_hex(4)}")
    options.setdefault("retry", FAST_RETRY)
    runner = OperationRunner(pool, publisher, hooks, backends, **options)
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        try:
            yield runner
        finally:
            tg.cancel_scope.cancel()


class Serving(Protocol):
    """``running`` with this test's pool, publisher and hooks (the ``serving`` fixture)."""

    def __call__(
        self, backends: Iterable[ProvisionerBackend], **options: Any
    ) -> AbstractAsyncContextManager[OperationRunner]: ...


async def wait_for(
    pool: asyncpg.Pool,
    op_id: str,
    done: Callable[[OperationRecord], bool] = lambda op: op.finalized_at is not None,
    *,
    limit: float = 40,
) -> OperationRecord:
    """Polls the operation until ``done`` (by default: finished and reported)."""
    with anyio.fail_after(limit):
        while True:
            async with pool.acquire() as conn:
                op = await get_operation(conn, op_id)
            if op is not None and done(op):
                return op
            await anyio.sleep(0.05)


async def read_events(redis: Redis, prefix: str, topic: str) -> list[dict[str, Any]]:
    """Every event of a topic's Stream, oldest first (XRANGE), as the data dicts."""
    raw = await redis.xrange(stream_key(prefix, topic))
    entries = cast("list[tuple[bytes, dict[bytes, bytes]]]", raw)
    events = []
    for _entry_id, fields in entries:
        data: dict[str, Any] = json.loads(fields[b"d"])
        assert data["type"] == fields[b"t"].decode()
        events.append(data)
    return events


async def operation_events(redis: Redis, prefix: str, op_id: str) -> list[dict[str, Any]]:
    return await read_events(redis, prefix, operation_topic(op_id))


async def user_events(redis: Redis, prefix: str, user_id: str) -> list[dict[str, Any]]:
    return await read_events(redis, prefix, user_topic(user_id))


async def server_objects(admin_dsn: str, name_prefix: str) -> tuple[list[str], list[str]]:
    """The databases and roles on the server whose names start with ``name_prefix``."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        pattern = name_prefix.replace("_", r"\_") + "%"
        dbs = await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE $1", pattern)
        roles = await conn.fetch("SELECT rolname FROM pg_roles WHERE rolname LIKE $1", pattern)
    finally:
        await conn.close()
    return [r["datname"] for r in dbs], [r["rolname"] for r in roles]


async def drop_server_objects(admin_dsn: str, name_prefix: str) -> None:
    """Drops every database and role whose name starts with ``name_prefix``."""
    dbs, roles = await server_objects(admin_dsn, name_prefix)
    conn = await asyncpg.connect(admin_dsn)
    try:
        for db in dbs:
            await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(db)} WITH (FORCE)")
        for role in roles:
            await conn.execute(f"DROP ROLE IF EXISTS {quote_ident(role)}")
    finally:
        await conn.close()


async def with_admin(admin_dsn: str, fn: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
    conn = await asyncpg.connect(admin_dsn)
    try:
        return await fn(conn)
    finally:
        await conn.close()


async def createrole_admin(admin_dsn: str, name_prefix: str) -> str:
    """The DSN of a new CREATEDB CREATEROLE role that is not a superuser (what
    `PROVISIONER_DATABASE_URL` may name), on the server of ``admin_dsn``."""
    admin = f"{name_prefix}admin"
    await with_admin(
        admin_dsn,
        lambda c: c.execute(f"CREATE ROLE \"{admin}\" LOGIN CREATEDB CREATEROLE PASSWORD 'pw'"),
    )
    parts = urlsplit(admin_dsn)  # a host and port, or a socket in ?host=
    server = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{admin}:pw@{server}").geturl()


def new_subject() -> str:
    return f"sub_{secrets.token_hex(12)}"
