"""Reading what Lookout needs out of Stripe payloads, in the current API shape and the older one."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from app.billing.provider import SUBSCRIPTION_ID_KEY, InvoiceInfo

__all__ = [
    "invoice_info",
    "invoice_subscription_details",
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


def invoice_subscription_details(invoice: Mapping[str, Any]) -> Mapping[str, Any]:
    """`parent.subscription_details` of an invoice (its subscription and that one's metadata)."""
    parent = invoice.get("parent")
    details = parent.get("subscription_details") if isinstance(parent, Mapping) else None
    return details if isinstance(details, Mapping) else {}


def invoice_subscription_id(invoice: Mapping[str, Any]) -> str | None:
    parent = invoice.get("parent")
    if isinstance(parent, Mapping):
        details = parent.get("subscription_details")
        if isinstance(details, Mapping) and object_id(details.get("subscription")):
            return object_id(details.get("subscription"))
    return object_id(invoice.get("subscription"))


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _amount(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def invoice_info(invoice: Mapping[str, Any]) -> InvoiceInfo:
    """An invoice as a webhook carries it, or as the SDK answers (its objects are mappings)."""
    details = invoice_subscription_details(invoice)
    lines = _mapping(invoice.get("lines")).get("data")
    periods = [_mapping(_mapping(line).get("period")) for line in lines or []]
    starts = [t for t in (timestamp(p.get("start")) for p in periods) if t is not None]
    ends = [t for t in (timestamp(p.get("end")) for p in periods) if t is not None]
    metadata = _mapping(details.get("metadata"))

    def text(key: str) -> str | None:
        value = invoice.get(key)
        return value if isinstance(value, str) else None

    return InvoiceInfo(
        id=str(invoice.get("id", "")),
        number=text("number"),
        status=text("status"),
        amount_due=_amount(invoice.get("amount_due")),
        amount_paid=_amount(invoice.get("amount_paid")),
        currency=text("currency") or "usd",
        period_start=min(starts) if starts else timestamp(invoice.get("period_start")),
        period_end=max(ends) if ends else timestamp(invoice.get("period_end")),
        hosted_invoice_url=text("hosted_invoice_url"),
        customer_id=object_id(invoice.get("customer")),
        subscription_id=invoice_subscription_id(invoice),
        created=timestamp(invoice.get("created")),
        metadata={str(k): str(v) for k, v in metadata.items()},
    )
