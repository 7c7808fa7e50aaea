"""The reconciler: what each subscription's status requires of its resource, made true.

The webhook paths are edge-triggered: a deprovision starts on the transition to `canceled`,
after that commit, and a provision after the commit of `provisioning`. A crash or a failed
`OperationRunner.start` in between, a provision that completed after its subscription was
canceled, or an operator's repair by hand leave a state that no later event revisits. Every
`SWEEP_SECONDS`, each instance compares what each subscription's status requires
(`required_state`) with what exists (its latest resource, its operations) and starts the
operation that is missing through the runner. An operation under way has the floor: the
reconciler acts only on subscriptions with none, and only once they have been still for
`SETTLE_SECONDS` (the edge-triggered path gets its chance first).

Instances share the work without doing it twice: each subscription is examined under its row
lock taken with `SKIP LOCKED`, and the operations it starts are idempotent by (kind, subject,
generation), so two sweeps that meet start one operation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import anyio
import asyncpg

from app.audit import record_audit
from app.billing.errors import OUTAGES
from app.billing.fulfilment import resource_spec
from app.billing.lifecycle import Lifecycle
from app.billing.plans import UnknownPlan
from app.billing.subscriptions import SubscriptionRecord, get_subscription
from app.db import Connection
from provisioning import (
    BackendNotConfigured,
    NothingToDeprovision,
    OperationRecord,
    ResourceRecord,
    get_operation_for_subject,
    resource_for_subject,
)

__all__ = ["REQUIRED", "Reconciler", "Repair", "Required", "required_state"]

logger = logging.getLogger(__name__)

SWEEP_SECONDS = 30.0
# A subscription changed this recently is left to the path that changed it: that path starts
# its operation milliseconds after its commit, and the reconciler is for when it never does.
SETTLE_SECONDS = 10.0
# Subscriptions examined per sweep; the next sweep takes the rest.
BATCH = 100

# present: its resource exists and is usable; absent: nothing of it is left on any server;
# provisioning: a provision exists (the runner resumes it wherever it stopped).
Required = Literal["present", "absent", "provisioning"]

# What each status requires. A status not listed is left alone: `pending_payment` has bought
# nothing yet. `present` is about existence: whether the login may use it (suspended for
# `unpaid`, `paused` and a `past_due` whose grace has ended) is `app.billing.access`'s.
REQUIRED: Mapping[str, Required] = MappingProxyType(
    {
        "provisioning": "provisioning",
        "active": "present",
        "past_due": "present",
        "unpaid": "present",
        "paused": "present",
        "canceled": "absent",
        "failed": "absent",
        "expired": "absent",
    }
)

# Resource statuses that still hold something on a provisioning server; `orphaned` ones are
# the `OrphanReaper`'s.
_LIVE = ("provisioning", "active", "suspended", "deprovisioning")
# A resource that exists for its customer, whatever its login may do now.
_PRESENT = ("active", "suspended")


def required_state(record: SubscriptionRecord) -> Required | None:
    """What the subscription's status requires of its resource; None: nothing to enforce."""
    return REQUIRED.get(record.status)


@dataclass(frozen=True, slots=True)
class Repair:
    """What one sweep did about one subscription: `started` a provision or a deprovision
    (`operation_id`), or `reported` a paid-for resource that is missing."""

    subscription_id: str
    action: Literal["provision", "deprovision", "reported"]
    operation_id: str | None = None


def _statuses(required: Required) -> list[str]:
    return [status for status, needs in REQUIRED.items() if needs == required]


# The subscriptions whose state is not what their status requires, with no operation under
# way. The statuses come from `REQUIRED`, so this is the same rule as `required_state`.
_CANDIDATES = """
SELECT s.id FROM subscriptions s
  LEFT JOIN LATERAL (SELECT r.status FROM resources r WHERE r.subject_id = s.id
                      ORDER BY r.created_at DESC LIMIT 1) r ON true
 WHERE s.updated_at < now() - make_interval(secs => $4::float8)
   AND NOT EXISTS (SELECT FROM operations o
                    WHERE o.subject_id = s.id AND o.finished_at IS NULL)
   AND ((s.status = ANY($1::text[]) AND r.status = ANY($6::text[]))
        OR (s.status = ANY($2::text[]) AND (r.status IS NULL OR r.status <> ALL($7::text[]))
            AND NOT EXISTS (SELECT FROM audit_log a
                             WHERE a.subject_id = s.id AND a.kind = 'subscription.resource_missing'
                               AND a.at >= s.updated_at))
        OR (s.status = ANY($3::text[])
            AND NOT EXISTS (SELECT FROM operations o
                             WHERE o.subject_id = s.id AND o.kind = 'provision')))
 ORDER BY s.updated_at
 LIMIT $5
"""


class Reconciler:
    """Makes each subscription's resource what its status requires (see the module)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        lifecycle: Lifecycle,
        *,
        sweep_seconds: float = SWEEP_SECONDS,
        settle_seconds: float = SETTLE_SECONDS,
    ) -> None:
        self._pool = pool
        self._lifecycle = lifecycle
        self._sweep_seconds = sweep_seconds
        self._settle_seconds = settle_seconds

    async def run(self) -> None:
        """Sweeps every `sweep_seconds` until cancelled."""
        while True:
            try:
                await self.reconcile_once()
            except OUTAGES as exc:
                logger.warning("the reconciler's sweep failed (%r); retrying at the next one", exc)
            await anyio.sleep(self._sweep_seconds)

    async def reconcile_once(self) -> list[Repair]:
        """One sweep: answers what it repaired."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                _CANDIDATES,
                _statuses("absent"),
                _statuses("present"),
                _statuses("provisioning"),
                self._settle_seconds,
                BATCH,
                list(_LIVE),
                list(_PRESENT),
            )
        repairs = []
        for row in rows:
            try:
                repair = await self._reconcile(row["id"])
            except (NothingToDeprovision, BackendNotConfigured, UnknownPlan) as exc:
                # Its state moved on meanwhile, or it names a plan or a resource type this
                # deployment no longer has: nothing the runner can do; say so and go on.
                logger.warning("cannot reconcile subscription %s: %s", row["id"], exc)
                continue
            if repair is not None:
                repairs.append(repair)
        return repairs

    async def _reconcile(self, subscription_id: str) -> Repair | None:
        async with self._pool.acquire() as conn, conn.transaction():
            # Locked while deciding and starting, so that neither another instance's sweep nor a
            # webhook changes it in between; a row locked by either is left to the next sweep.
            record = await get_subscription(
                conn, subscription_id, for_update=True, skip_locked=True
            )
            if record is None:
                return None
            required = required_state(record)
            resource = await resource_for_subject(conn, record.id)
            provision = await get_operation_for_subject(conn, "provision", record.id)
            deprovision = await get_operation_for_subject(conn, "deprovision", record.id)
            if _under_way(provision) or _under_way(deprovision):
                return None
            live = resource is not None and resource.status in _LIVE
            if required == "absent" and live:
                # `again`: a deprovision that completed before a late provision brought the
                # resource back is followed by a new one.
                op = await self._lifecycle.runner.start(
                    "deprovision", record.id, record.user_id, resource_spec(record), again=True
                )
                await self._audit(conn, record, required, resource, "deprovision", op.id)
                return Repair(record.id, "deprovision", op.id)
            if required == "present" and (resource is None or resource.status not in _PRESENT):
                await self._report_missing(conn, record, resource)
                return Repair(record.id, "reported")
            if not (required == "provisioning" and provision is None):
                return None
        # Paid, and the crash came before its provision started: `fulfil` heals exactly that,
        # under its own lock (its write of `operation_id` would wait for ours).
        after = await self._lifecycle.fulfil(
            record.id, stripe_subscription_id=None, customer_id=None, source="reconciler"
        )
        if after is None or after.operation_id is None:
            return None
        async with self._pool.acquire() as conn:
            await self._audit(conn, after, required, resource, "provision", after.operation_id)
        return Repair(record.id, "provision", after.operation_id)

    async def _audit(
        self,
        conn: Connection,
        record: SubscriptionRecord,
        required: Required | None,
        resource: ResourceRecord | None,
        action: str,
        operation_id: str,
    ) -> None:
        logger.warning(
            "subscription %s is %s, which requires its resource %s: started %s %s",
            record.id,
            record.status,
            required,
            action,
            operation_id,
        )
        await record_audit(
            conn,
            "subscription.reconciled",
            user_id=record.user_id,
            subject_id=record.id,
            detail={
                "status": record.status,
                "required": required,
                "action": action,
                "operation_id": operation_id,
                "resource_status": resource.status if resource else None,
            },
        )

    async def _report_missing(
        self, conn: Connection, record: SubscriptionRecord, resource: ResourceRecord | None
    ) -> None:
        """A paid-for resource that is gone is reported, not provisioned again: a new, empty
        database under the old name would hide the loss. Something removed it outside
        Lookout's own paths, and an operator must look (restore it, or cancel and refund).
        Reported once per change of the subscription."""
        found = resource.status if resource else "missing"
        logger.error(
            "subscription %s is %s but its resource %s is %s; an operator must restore it",
            record.id,
            record.status,
            record.resource_id,
            found,
        )
        await record_audit(
            conn,
            "subscription.resource_missing",
            user_id=record.user_id,
            subject_id=record.id,
            detail={"resource_id": record.resource_id, "resource_status": found},
        )


def _under_way(op: OperationRecord | None) -> bool:
    return op is not None and op.finished_at is None
