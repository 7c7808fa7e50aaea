"""Provisioning: durable in-process operations that create and remove customer resources.

The face holds what the layer above calls; everything else is imported from its module.
"""

from __future__ import annotations

from .backend import Credentials, OperationKind, ProvisionerBackend, ResourceSpec, Step, StepContext
from .bulk import ProvisionRequest
from .errors import (
    DATABASE_ERRORS,
    BackendNotConfigured,
    NothingToDeprovision,
    OperationNotCancellable,
    OperationNotFound,
    ProvisioningError,
    ResourceNotFound,
)
from .execution import TERMINAL_EVENT_TYPES
from .graph import HEAVY_AT_ONCE, GraphBackend, StorageMeter
from .hooks import SubscriptionHooks
from .operations import (
    TERMINAL_STATUSES,
    OperationRecord,
    get_operation,
    get_operation_for_subject,
    operation_counts,
    operation_durations,
)
from .placement import PlacedGraphBackend
from .repository import SharedRepositoryBackend
from .resources import ResourceRecord, resource_for_subject
from .retry import RetryPolicy
from .runner import OperationRunner
from .servers import ServerState
from .warm_pool import WarmPool, warm_pool_counts

# A ProvisionerBackend written elsewhere needs Step, StepContext, Credentials, ProvisioningError.
__all__ = [
    "DATABASE_ERRORS",
    "HEAVY_AT_ONCE",
    "TERMINAL_EVENT_TYPES",
    "TERMINAL_STATUSES",
    "BackendNotConfigured",
    "Credentials",
    "GraphBackend",
    "NothingToDeprovision",
    "OperationKind",
    "OperationNotCancellable",
    "OperationNotFound",
    "OperationRecord",
    "OperationRunner",
    "PlacedGraphBackend",
    "ProvisionRequest",
    "ProvisionerBackend",
    "ProvisioningError",
    "ResourceNotFound",
    "ResourceRecord",
    "ResourceSpec",
    "RetryPolicy",
    "ServerState",
    "SharedRepositoryBackend",
    "Step",
    "StepContext",
    "StorageMeter",
    "SubscriptionHooks",
    "WarmPool",
    "get_operation",
    "get_operation_for_subject",
    "operation_counts",
    "operation_durations",
    "resource_for_subject",
    "warm_pool_counts",
]
