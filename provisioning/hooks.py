"""What provisioning needs from the layer above (``app/`` implements it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .operations import OperationRecord

__all__ = ["SubscriptionHooks"]


class SubscriptionHooks(Protocol):
    """Called by the runner; each call may be repeated after a crash, so each must be idempotent.

    ``provisioning_succeeded`` / ``provisioning_failed`` are called for operations of kind
    ``provision`` only (``failed`` also after a cancellation, with a sentence saying so), before
    the terminal event is published. An exception makes the runner retry the call later.
    ``audit`` receives every operation's start, resumption, cancellation request and outcome.
    ``provision_failed_note`` is what the customer is told follows a failed or cancelled
    provision (say, that their subscription is cancelled), in the caller's words; "" for nothing.
    """

    @property
    def provision_failed_note(self) -> str: ...

    async def provisioning_succeeded(self, operation: OperationRecord) -> None: ...

    async def provisioning_failed(
        self, operation: OperationRecord, customer_message: str
    ) -> None: ...

    async def audit(
        self,
        kind: str,
        *,
        subject_id: str | None,
        user_id: str | None,
        detail: Mapping[str, Any],
    ) -> None: ...
