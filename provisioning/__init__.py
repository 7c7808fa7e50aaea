"""Provisioning: durable in-process operations that create and remove customer resources."""

from __future__ import annotations

from .backend import (
    CHANGE_KINDS,
    ConnectionMeter,
    Credentials,
    OperationKind,
    ProvisionerBackend,
    ResourceSpec,
    Step,
    StepContext,
)
from .bulk import ProvisionRequest
from .errors import (
    BackendNotConfigured,
    LeaseLost,
    NothingToDeprovision,
    OperationNotCancellable,
    OperationNotFound,
    PlanLimitExceeded,
    ProvisioningError,
    ResourceNotFound,
    RunnerNotRunning,
    is_transient,
)
from .foreground import Foreground
from .graph import GraphBackend, StorageMeter
from .hooks import SubscriptionHooks
from .operations import OperationRecord, OperationStatus, get_operation, get_operation_for_subject
from .repository import SharedRepositoryBackend
from .resources import ResourceRecord, get_resource, resource_for_subject
from .retry import RetryPolicy
from .runner import OperationRunner

__all__ = [
    "CHANGE_KINDS",
    "BackendNotConfigured",
    "ConnectionMeter",
    "Credentials",
    "Foreground",
    "GraphBackend",
    "LeaseLost",
    "NothingToDeprovision",
    "OperationKind",
    "OperationNotCancellable",
    "OperationNotFound",
    "OperationRecord",
    "OperationRunner",
    "OperationStatus",
    "PlanLimitExceeded",
    "ProvisionRequest",
    "ProvisionerBackend",
    "ProvisioningError",
    "ResourceNotFound",
    "ResourceRecord",
    "ResourceSpec",
    "RetryPolicy",
    "RunnerNotRunning",
    "SharedRepositoryBackend",
    "Step",
    "StepContext",
    "StorageMeter",
    "SubscriptionHooks",
    "get_operation",
    "get_operation_for_subject",
    "get_resource",
    "is_transient",
    "resource_for_subject",
]
