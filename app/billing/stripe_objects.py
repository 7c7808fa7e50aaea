"""Reading what Lookout needs out of Stripe payloads, in the current API shape and the older one."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from app.billing.provider import SUBSCRIPTION_ID_KEY

__all__ = [
    "invoice_subscription_id",
    "lookout_id",
    "object_id",
    "period_end",
    "timestamp",
]


def timestamp(value: Any) -> datetime | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return datetime.fromtimestamp(value, UTC)
    return None


def object_id(value: Any) -> str | None:
    """A reference is an id, or the expanded object that has one."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("id"), str):
        found: str = value["id"]
        return found
    return None


def lookout_id(obj: Mapping[str, Any]) -> str | None:
    """Our subscription's id, from the object's metadata; for an invoice, from its
    subscription's metadata, which Stripe copies into it: an invoice event that comes before
    any event naming the Stripe subscription still finds ours."""
    parent = obj.get("parent")
    details = parent.get("subscription_details") if isinstance(parent, Mapping) else None
    for metadata in (obj.get("metadata"), details.get("metadata") if details else None):
        if isinstance(metadata, Mapping) and isinstance(metadata.get(SUBSCRIPTION_ID_KEY), str):
            found: str = metadata[SUBSCRIPTION_ID_KEY]
            return found
    reference = obj.get("client_reference_id")
    return reference if isinstance(reference, str) and reference.startswith("sub_") else None


def period_end(subscription: Mapping[str, Any]) -> datetime | None:
    """Current API versions keep the period on the subscription items."""
    items = subscription.get("items")
    if isinstance(items, Mapping) and isinstance(items.get("data"), list):
        ends = [
            timestamp(i.get("current_period_end")) for i in items["data"] if isinstance(i, Mapping)
        ]
        known = [e for e in ends if e is not None]
        if known:
            return max(known)
    return timestamp(subscription.get("current_period_end"))


def invoice_subscription_id(invoice: Mapping[str, Any]) -> str | None:
    parent = invoice.get("parent")
    if isinstance(parent, Mapping):
        details = parent.get("subscription_details")
        if isinstance(details, Mapping) and object_id(details.get("subscription")):
            return object_id(details.get("subscription"))
    return object_id(invoice.get("subscription"))
