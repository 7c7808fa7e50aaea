"""The words the layer above hands the streams under test: which events end a topic, and which
snapshot statuses say a subject is finished (the app passes provisioning's)."""

from __future__ import annotations

from typing import Final

TERMINAL_TYPES: Final = frozenset(
    {"operation.completed", "operation.failed", "operation.cancelled"}
)
FINAL_STATUSES: Final = frozenset({"completed", "failed", "cancelled"})
