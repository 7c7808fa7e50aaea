"""The seam between the runner and what it provisions: specs, steps and the backend Protocol."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal, Protocol, runtime_checkable
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = [
    "CHANGE_KINDS",
    "ConnectionMeter",
    "Credentials",
    "OperationKind",
    "ProvisionerBackend",
    "ResourceSpec",
    "Step",
    "StepContext",
]

OperationKind = Literal["provision", "deprovision", "resize", "suspend", "resume"]
# Operations that change a resource that exists and stays: a plan change (``resize``: the
# spec carries the new plan's limits), shutting its login out (``suspend``: payment stopped)
# and letting it in again (``resume``). A subject may have any number of each, one
# generation after another, run in the order they were created.
CHANGE_KINDS: Final = frozenset({"resize", "suspend", "resume"})


@dataclass(frozen=True, slots=True)
class ResourceSpec:
    """What to provision: plans live in ``app/``, so their limits arrive here as data.

    Limits understood: ``max_resources`` (how many resources of this plan one user may hold at
    once) and ``max_connections`` (the login role's connection limit, and a graph database's).
    """

    resource_type: str
    plan_name: str
    limits: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "limits", MappingProxyType(dict(self.limits)))

    def to_json(self) -> dict[str, Any]:
        return {
            "resource_type": self.resource_type,
            "plan_name": self.plan_name,
            "limits": dict(self.limits),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ResourceSpec:
        return cls(
            resource_type=str(data["resource_type"]),
            plan_name=str(data["plan_name"]),
            limits={str(k): int(v) for k, v in dict(data.get("limits") or {}).items()},
        )


@dataclass(frozen=True, slots=True)
class Credentials:
    """A login for a provisioned resource; returned once, kept nowhere, never logged."""

    database: str
    user: str
    password: str = field(repr=False)
    dsn: str = field(repr=False)

    @property
    def host(self) -> str:
        """The server's host, as the DSN names it (a directory for a Unix socket)."""
        parts = urlsplit(self.dsn)
        # libpq reads ?host= too (a socket directory) and lets it win over the netloc's.
        query = dict(parse_qsl(parts.query))
        return query.get("host") or unquote(parts.hostname or "") or "localhost"

    @property
    def port(self) -> int:
        parts = urlsplit(self.dsn)
        query = dict(parse_qsl(parts.query))
        return int(query.get("port") or parts.port or 5432)

    def as_json(self) -> dict[str, Any]:
        """What the credentials routes answer: `{"host", "port", "database", "user",
        "password", "dsn"}`, for a graph and a repository alike."""
        return {
            "host": self.host,
            "port": self.port,
            "database": self.database,
            "user": self.user,
            "password": self.password,
            "dsn": self.dsn,
        }


@dataclass(frozen=True, slots=True)
class StepContext:
    """Everything a step may know; the same on every attempt, so that steps can be redone."""

    operation_id: str
    kind: OperationKind
    subject_id: str
    user_id: str
    resource_id: str
    spec: ResourceSpec


@dataclass(frozen=True, slots=True)
class Step:
    """One idempotent step: ``name`` goes into events and the table, ``message`` to customers.

    ``needed``, when given, is asked just before the step would begin: False skips it with no
    write and no event (an earlier step of this attempt did its work, as a warm pool's
    database comes with its roles, grants and schema). A skipped step is not recorded as
    done: an attempt resumed elsewhere asks again, and runs it."""

    name: str
    message: str
    run: Callable[[StepContext], Awaitable[None]]
    needed: Callable[[StepContext], bool] | None = None


class ProvisionerBackend(Protocol):
    """Creates and removes one type of resource on the provisioner server.

    Every step and ``teardown`` must be idempotent: a step may be redone after it half-ran
    (a crash, a cancellation, a retry), and teardown must succeed whatever is left, including
    nothing at all.
    """

    @property
    def resource_type(self) -> str:
        """``graph`` or ``repository``: matches ``ResourceSpec.resource_type``."""
        ...

    @property
    def id_prefix(self) -> str:
        """The prefix of this backend's resource ids (``gr``, ``repo``)."""
        ...

    def steps(self, kind: OperationKind) -> Sequence[Step]:
        """The steps of an operation of ``kind``, in order."""
        ...

    async def teardown(self, resource_id: str) -> None:
        """Removes everything a provision of ``resource_id`` may have created."""
        ...

    async def rotate_credentials(self, resource_id: str) -> Credentials:
        """Sets a new random password and returns it, once. Raises ``ResourceNotFound``."""
        ...


@runtime_checkable
class ConnectionMeter(Protocol):
    """A backend that can count the sessions a resource's login holds open now (what a
    smaller plan's connection limit must fit)."""

    async def open_connections(self, resource_id: str) -> int:
        """Sessions of the resource's login on the server now; 0 when it has none."""
        ...
