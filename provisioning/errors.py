"""Named failures of provisioning, and which exceptions are worth retrying."""

from __future__ import annotations

import asyncpg
import redis.exceptions

__all__ = [
    "DATABASE_ERRORS",
    "BackendNotConfigured",
    "LeaseLost",
    "NoServerAvailable",
    "NothingToDeprovision",
    "OperationNotCancellable",
    "OperationNotFound",
    "PlanLimitExceeded",
    "ProvisioningError",
    "ResourceNotFound",
    "RunnerNotRunning",
    "ServerNotConfigured",
    "is_transient",
]


class NoServerAvailable(Exception):
    """Every provisioning server is drained: a new graph has nowhere to go. Worth another try:
    the operation waits, as for an outage, until an operator undrains or adds a server."""


class ServerNotConfigured(LookupError):
    """A resource lives on a provisioning server this process does not know. Worth another
    try: during a rolling deployment that adds a server, an instance with the older list can
    meet a graph placed there by a newer one. Give every instance the same list of servers."""


# What a call to PostgreSQL raises when the server, the network or the connection failed it:
# a background loop catches these, logs one line and tries again later. (`TimeoutError` is an
# `OSError`.)
DATABASE_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # A terminated backend sends FATAL, then closes. An idle pooled connection that has read
    # the FATAL but not yet the close is still handed out, and its first statement raises this
    # ("cannot switch to state 15; another operation (2) is in progress"); the pool's reset
    # then fails too and the connection is thrown away (asyncpg issue 1069).
    asyncpg.exceptions.InternalClientError,
)

# Worth another try: the server is down, restarting, full, or the network dropped the
# connection. Everything else (a bug, a refused privilege, a bad plan) fails at once.
_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,  # ConnectionRefusedError, ConnectionResetError, socket timeouts...
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.TooManyConnectionsError,
    asyncpg.CannotConnectNowError,
    asyncpg.ObjectInUseError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.InternalClientError,  # see DATABASE_ERRORS
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    NoServerAvailable,
    ServerNotConfigured,
)


def is_transient(exc: BaseException) -> bool:
    """True for errors that another attempt after a pause may not meet again."""
    if isinstance(exc, _TRANSIENT):
        return True
    # A connection dropped inside `async with conn.transaction()`: leaving the block raises
    # asyncpg's InterfaceError ("the underlying connection is closed") over the real cause.
    # Other InterfaceErrors (an operation already in progress...) are bugs, not outages.
    return isinstance(exc, asyncpg.InterfaceError) and (
        "connection is closed" in str(exc)
        or (exc.__context__ is not None and isinstance(exc.__context__, _TRANSIENT))
    )


class ProvisioningError(Exception):
    """A step failed for a reason that retrying cannot fix.

    ``customer_message`` is a whole sentence shown to the customer (in the operation's
    ``error`` and its ``operation.failed`` event): no DSN, no SQL, no traceback.
    """

    def __init__(self, customer_message: str) -> None:
        super().__init__(customer_message)
        self.customer_message = customer_message


class OperationNotFound(LookupError):
    """No operation has this id; check the id returned by ``OperationRunner.start``."""


class OperationNotCancellable(Exception):
    """Only a provisioning operation that has not finished can be cancelled."""


class NothingToDeprovision(LookupError):
    """The subject has no provisioned resource; there is nothing to deprovision."""


class ResourceNotFound(LookupError):
    """The resource does not exist (or no longer exists) on the provisioner server."""


class RunnerNotRunning(RuntimeError):
    """``OperationRunner.start`` was called before ``run`` started (start it in a task group)."""


class BackendNotConfigured(LookupError):
    """No backend handles this resource type; pass one to ``OperationRunner(backends=...)``."""


class PlanLimitExceeded(ProvisioningError):
    """The user already holds as many resources of this type as the plan allows."""


class LeaseLost(Exception):
    """Another instance owns this operation now; this instance must stop working on it."""
