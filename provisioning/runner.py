"""The in-process runner: starts operations at once, keeps them leased, resumes orphans."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Sequence

import anyio
import asyncpg
from anyio.abc import TaskGroup, TaskStatus

from streams import Event, EventPublisher, Supervisor

from . import leases
from . import operations as ops
from .backend import (
    CHANGE_KINDS,
    ConnectionMeter,
    Credentials,
    OperationKind,
    ProvisionerBackend,
    ResourceSpec,
)
from .bulk import ProvisionRequest, create_provisions
from .errors import (
    DATABASE_ERRORS,
    BackendNotConfigured,
    NothingToDeprovision,
    OperationNotCancellable,
    OperationNotFound,
    ResourceNotFound,
    RunnerNotRunning,
)
from .execution import Executor
from .foreground import Foreground
from .hooks import SubscriptionHooks
from .lease_keeper import LeaseKeeper
from .operations import OperationRecord
from .pgadmin import AdminConnections
from .reaper import OrphanReaper
from .resources import get_resource, resource_for_subject
from .retry import RetryPolicy
from .workers import OperationTask, Workers

__all__ = ["OperationRunner"]

logger = logging.getLogger(__name__)


class OperationRunner:
    """Runs provisioning operations inside the app's task group (``await tg.start(runner.run)``).

    ``start`` inserts the operation leased to this instance and runs it at once; while it runs
    its lease is renewed every ``lease_seconds / 3``. ``run`` holds this instance's advisory
    lock (``leases.InstanceLock``) and sweeps at start-up and every ``sweep_interval`` seconds
    (1 s by default) for operations whose instance died (its lock is free: at once) or stalled
    (its lease expired), and resumes them from their last completed step. At most
    ``max_concurrent`` run their steps at once; the others wait, announced and leased, for
    ``workers.SLOT_WAIT_SECONDS``, then give their lease up for whichever instance has room
    (this one too, as soon as a slot frees up: its sweep is woken then). An
    outcome the hooks or Redis could not take is offered again ``finalize_retry_seconds``
    later; resources whose removal failed are removed again every ``orphan_retry_seconds``.
    An operation that gets a slot first gives way to ``give_way_to`` (the webhook intake), for
    at most ``give_way_seconds``.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        publisher: EventPublisher,
        hooks: SubscriptionHooks,
        backends: Iterable[ProvisionerBackend],
        *,
        instance_id: str,
        max_concurrent: int = 10,
        lease_seconds: float = 15.0,
        sweep_interval: float | None = None,
        retry: RetryPolicy | None = None,
        finalize_retry_seconds: float = 30.0,
        orphan_retry_seconds: float = 60.0,
        give_way_to: Foreground | None = None,
        give_way_seconds: float = 0.5,
    ) -> None:
        if max_concurrent < 1 or lease_seconds <= 0:
            raise ValueError("OperationRunner needs max_concurrent >= 1 and lease_seconds > 0")
        self._pool = pool
        self._hooks = hooks
        self._backends = {b.resource_type: b for b in backends}
        self._instance_id = instance_id
        self._max_concurrent = max_concurrent
        self._lease_seconds = lease_seconds
        self._sweep_interval = (
            sweep_interval if sweep_interval is not None else min(1.0, lease_seconds / 3)
        )
        self._retry = retry or RetryPolicy()
        self._exec = Executor(
            pool,
            publisher,
            hooks,
            owner=instance_id,
            retry=self._retry,
            lease_seconds=lease_seconds,
        )
        self._lock = leases.InstanceLock(pool, instance_id)
        self._leases = LeaseKeeper(pool, instance_id, lease_seconds)
        self._reaper = OrphanReaper(pool, hooks, self._backends, interval=orphan_retry_seconds)
        # One admin connection per server for each operation running at once, kept open
        # between operations (pruned by the sweep once idle, closed when the runner stops).
        self._admin = AdminConnections(max_idle=max_concurrent)
        self._workers = Workers(
            pool,
            self._exec,
            self._leases,
            self.backend,
            owner=instance_id,
            max_concurrent=max_concurrent,
            finalize_retry=finalize_retry_seconds,
            give_way_to=give_way_to,
            give_way_seconds=give_way_seconds,
            admin=self._admin,
        )
        self._tg: TaskGroup | None = None

    @property
    def instance_id(self) -> str:
        return self._instance_id

    @property
    def max_concurrent(self) -> int:
        return self._max_concurrent

    @property
    def active(self) -> frozenset[str]:
        """Ids of the operations this process works on now."""
        return self._workers.active

    async def quiet(self) -> None:
        """Returns once this process works on no operation (``provisioning.Foreground``: the
        warm pool's refill gives way to the operations customers wait on)."""
        await self._workers.quiet()

    def backend(self, resource_type: str) -> ProvisionerBackend:
        try:
            return self._backends[resource_type]
        except KeyError:
            raise BackendNotConfigured(
                f"no provisioning backend for resource type {resource_type!r}"
            ) from None

    async def run(
        self,
        *,
        supervisor: Supervisor | None = None,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serves until cancelled; cancelling it stops every operation and frees their leases.

        The sweep, the lease keeper and the orphan reaper each run under ``supervisor`` (the
        process's, so that health checks see them): a crash of one restarts that loop alone,
        never the operations running in this task group."""
        supervisor = supervisor or Supervisor()
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await tg.start(supervisor.run_starting, "instance-lock", self._lock.run)
                tg.start_soon(supervisor.run, "orphan-reaper", self._reaper.run)
                tg.start_soon(supervisor.run, "operation-lease-keeper", self._leases.run)
                tg.start_soon(supervisor.run, "operation-sweep", self._sweep_loop)
                try:
                    task_status.started()
                    await anyio.sleep_forever()
                finally:
                    self._tg = None
        finally:
            # Every operation has stopped: what they kept open is closed.
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self._admin.close()

    async def _sweep_loop(self) -> None:
        while True:
            try:
                await self.sweep()
                await self._admin.prune()
            except DATABASE_ERRORS as exc:
                # PostgreSQL is away: the next sweep tries again. Anything else is a bug, for
                # the supervisor to log with its traceback.
                logger.warning(
                    "sweep failed (%s); next in %.1fs", type(exc).__name__, self._sweep_interval
                )
            with anyio.move_on_after(self._sweep_interval):
                await self._workers.slot_freed()

    async def start(
        self,
        kind: OperationKind,
        subject_id: str,
        user_id: str,
        spec: ResourceSpec,
        *,
        resource_id: str | None = None,
        again: bool = False,
    ) -> OperationRecord:
        """The subject's operation of ``kind``: created and started now, or the existing one.

        A deprovision finds the subject's resource when ``resource_id`` is not given (raises
        ``NothingToDeprovision``), and cancels the subject's provision if it is still running.
        With ``again``, a deprovision that has finished is followed by a new one (the next
        ``generation``): how a reconciler removes a resource that came back after it.
        """
        if self._tg is None:
            raise RunnerNotRunning("start OperationRunner.run in a task group first")
        backend = self.backend(spec.resource_type)
        provision: OperationRecord | None = None
        generation = 0
        async with self._pool.acquire() as conn:
            if kind == "deprovision":
                existing = await ops.get_operation_for_subject(conn, kind, subject_id)
                if existing is not None:
                    if not (again and existing.is_terminal):
                        return existing
                    generation = existing.generation + 1
                if resource_id is None:
                    resource = await resource_for_subject(conn, subject_id)
                    if resource is None:
                        raise NothingToDeprovision(f"subject {subject_id} has no resource")
                    resource_id = resource.id
                provision = await ops.get_operation_for_subject(conn, "provision", subject_id)
            op, created = await ops.create_operation(
                conn,
                op_id=f"op_{secrets.token_hex(12)}",
                kind=kind,
                subject_id=subject_id,
                user_id=user_id,
                resource_id=resource_id or f"{backend.id_prefix}_{secrets.token_hex(12)}",
                spec=spec,
                lease_owner=self._instance_id,
                lease_seconds=self._lease_seconds,
                generation=generation,
            )
        if created:
            self._spawn(op)
            if kind == "deprovision" and provision is not None and not provision.is_terminal:
                await self.cancel(provision.id, wait=0)
        return op

    async def create_provisions(
        self, conn: ops.Connection, requests: Sequence[ProvisionRequest]
    ) -> list[OperationRecord]:
        """Inserts, in the caller's transaction, a provision for each request whose subject has
        none yet; ``launch`` announces and runs them once that transaction has committed. The
        caller audits ``operation.started`` of each in that transaction (``audit_detail``):
        one statement for all, where the runner would write a row each."""
        if self._tg is None:
            raise RunnerNotRunning("start OperationRunner.run in a task group first")
        for request in requests:
            self.backend(request.spec.resource_type)
        return await create_provisions(
            conn,
            [(f"op_{secrets.token_hex(12)}", request) for request in requests],
            lease_owner=self._instance_id,
            lease_seconds=self._lease_seconds,
        )

    async def create_change(
        self,
        conn: ops.Connection,
        kind: OperationKind,
        subject_id: str,
        user_id: str,
        spec: ResourceSpec,
        *,
        resource_id: str,
    ) -> OperationRecord:
        """Inserts, in the caller's transaction, the subject's next ``resize``, ``suspend`` or
        ``resume`` of ``resource_id`` (``spec``: the plan the resource must follow); ``launch``
        announces and runs it once that transaction has committed. Changes of one subject run
        one at a time, in the order they were created (decide them under a lock on the
        subject, and the order is the order of the decisions)."""
        if self._tg is None:
            raise RunnerNotRunning("start OperationRunner.run in a task group first")
        if kind not in CHANGE_KINDS:
            raise ValueError(f"{kind} is not a change of a resource; use start()")
        self.backend(spec.resource_type)
        return await ops.create_change(
            conn,
            op_id=f"op_{secrets.token_hex(12)}",
            kind=kind,
            subject_id=subject_id,
            user_id=user_id,
            resource_id=resource_id,
            spec=spec,
            lease_owner=self._instance_id,
            lease_seconds=self._lease_seconds,
        )

    async def open_connections(self, resource_id: str, resource_type: str) -> int | None:
        """Sessions the resource's login holds open now; None when its backend cannot tell."""
        backend = self.backend(resource_type)
        if not isinstance(backend, ConnectionMeter):
            return None
        return await self._retry.call(
            lambda: backend.open_connections(resource_id), what=f"{resource_id} sessions"
        )

    async def launch(
        self,
        created: Sequence[OperationRecord],
        *,
        along: Sequence[tuple[Event, Iterable[str]]] = (),
    ) -> None:
        """Announces operations from ``create_provisions`` in one round trip to Redis, with the
        events ``along`` after them, and runs them. Should this process die before, their
        leases expire and a sweep resumes them."""
        await self._exec.announce_many(created, along=along)
        for op in created:
            self._spawn(op, announced=True)

    async def cancel(self, op_id: str, *, wait: float = 10.0) -> OperationRecord:
        """Stops a provision that has not finished and rolls back what it created.

        Waits up to ``wait`` seconds when this process runs it (an instance that runs it
        elsewhere sees the request at its next lease renewal, or before its next step at the
        latest). Answers the operation as it
        is then; a finished one is answered unchanged.
        """
        async with self._pool.acquire() as conn:
            op = await ops.request_cancel(conn, op_id)
            if op is None:
                current = await ops.get_operation(conn, op_id)
                if current is None:
                    raise OperationNotFound(f"no operation {op_id}")
                if not current.is_terminal:
                    raise OperationNotCancellable(
                        f"operation {op_id} removes a resource and cannot be cancelled"
                    )
                return current
        await self._exec.audit("operation.cancel_requested", op)
        task = self._workers.get(op_id)
        if task is None and self._tg is not None:
            # Its instance may have died: take it up here, where the request is seen at once.
            async with self._pool.acquire() as conn:
                claimed = await leases.claim_operation(
                    conn, op_id, self._instance_id, self._lease_seconds
                )
            if claimed is not None:
                task = self._spawn(claimed)
        if task is None:
            return op
        task.cancel()
        with anyio.move_on_after(wait):
            await task.done.wait()
        async with self._pool.acquire() as conn:
            return await ops.get_operation(conn, op_id) or op

    async def sweep(self) -> int:
        """Claims operations whose lease expired, as many as there is room for; answers how many."""
        if self._tg is None:
            raise RunnerNotRunning("start OperationRunner.run in a task group first")
        room = self._workers.room
        if room <= 0:
            return 0
        async with self._pool.acquire(timeout=max(1.0, self._sweep_interval)) as conn:
            claimed = await leases.claim_expired(conn, self._instance_id, self._lease_seconds, room)
        self._workers.swept(all_claimed=len(claimed) < room)
        for op in claimed:
            logger.info("resuming operation %s (attempt %d)", op.id, op.attempts)
            self._spawn(op)
        return len(claimed)

    async def rotate_credentials(self, resource_id: str) -> Credentials:
        """A new password for an active resource, returned once (raises ``ResourceNotFound``)."""
        async with self._pool.acquire() as conn:
            resource = await get_resource(conn, resource_id)
        if resource is None or resource.status != "active":
            raise ResourceNotFound(f"no active resource {resource_id}")
        backend = self.backend(resource.resource_type)
        return await self._retry.call(
            lambda: backend.rotate_credentials(resource_id), what=f"{resource_id} credentials"
        )

    def _spawn(self, op: OperationRecord, *, announced: bool = False) -> OperationTask:
        if self._tg is None:
            raise RunnerNotRunning("start OperationRunner.run in a task group first")
        return self._workers.spawn(self._tg, op, announced=announced)
