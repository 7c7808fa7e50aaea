"""The emulator's in-memory state: objects by id, the request log, idempotency results, faults."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.demo.stripe_emulator.errors import StripeError
from app.demo.stripe_emulator.forms import as_int

Obj = dict[str, Any]

# What `No such <kind>` says for each object type.
_KIND_NAMES = {
    "customer": "customer",
    "product": "product",
    "price": "price",
    "checkout.session": "checkout.session",
    "subscription": "subscription",
    "invoice": "invoice",
    "event": "event",
    "setup_intent": "setupintent",
    "payment_method": "PaymentMethod",
    "billing_portal.session": "billing_portal.session",
    # payments and refunds
    "payment_intent": "payment_intent",
    "charge": "charge",
    "invoice_payment": "invoice_payment",
    "refund": "refund",
}
_PREFIXES = {
    "cus_": "customer",
    "prod_": "product",
    "price_": "price",
    "cs_": "checkout.session",
    "sub_": "subscription",
    "in_": "invoice",
    "evt_": "event",
    "seti_": "setup_intent",
    "pm_": "payment_method",
    "bps_": "billing_portal.session",
    # payments and refunds
    "pi_": "payment_intent",
    "ch_": "charge",
    "inpay_": "invoice_payment",
    "re_": "refund",
}


@dataclass
class RequestRecord:
    """One call that reached the emulated API, as `GET /_emulator/requests` lists it."""

    request_id: str
    method: str
    path: str
    idempotency_key: str | None
    params: Obj
    form: list[tuple[str, str]]
    stripe_version: str | None
    created: float
    status: int = 0
    replayed: bool = False

    def as_json(self) -> Obj:
        return {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "idempotency_key": self.idempotency_key,
            "params": self.params,
            "form": [list(pair) for pair in self.form],
            "stripe_version": self.stripe_version,
            "status": self.status,
            "idempotent_replayed": self.replayed,
            "created": self.created,
        }


@dataclass(frozen=True)
class SavedResponse:
    method: str
    path: str
    params: Obj
    status: int
    body: bytes
    request_id: str


@dataclass
class Fault:
    """The next `remaining` requests matching method and path prefix answer `status` (after
    `delay` seconds; a `status` of 200 only delays them, like a slow network)."""

    method: str
    path_prefix: str
    status: int
    remaining: int
    message: str = "An unknown error occurred (injected by the emulator)."
    error_type: str = "api_error"
    delay: float = 0.0

    def matches(self, method: str, path: str) -> bool:
        return (
            self.remaining > 0
            and self.method in (method, "*")
            and path.startswith(self.path_prefix)
        )


@dataclass
class EmulatorState:
    api_version: str
    public_url: str
    api_key: str | None = None
    clock: Callable[[], float] = time.time
    objects: dict[str, Obj] = field(default_factory=dict)
    order: dict[str, list[str]] = field(default_factory=dict)
    requests: list[RequestRecord] = field(default_factory=list)
    idempotency: dict[tuple[str, str], SavedResponse] = field(default_factory=dict)
    # (API key, Idempotency-Key) of requests executing now: a duplicate meanwhile gets 409.
    in_flight: set[tuple[str, str]] = field(default_factory=set)
    faults: list[Fault] = field(default_factory=list)
    session_items: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    session_subscription_data: dict[str, Obj] = field(default_factory=dict)
    invoice_numbers: int = 0
    # -- saved payment methods (issue 13): what charging each one does, by id: "succeeds",
    # "declined" or "requires_action" (the bank asks the customer to authenticate: SCA).
    card_outcomes: dict[str, str] = field(default_factory=dict)

    def now(self) -> int:
        return int(self.clock())

    def put(self, obj: Obj) -> Obj:
        if obj["id"] not in self.objects:
            self.order.setdefault(obj["object"], []).append(obj["id"])
        self.objects[obj["id"]] = obj
        return obj

    def get(self, obj_type: str, obj_id: str, *, param: str = "id") -> Obj:
        obj = self.objects.get(obj_id)
        if obj is None or obj["object"] != obj_type:
            raise StripeError.no_such(_KIND_NAMES.get(obj_type, obj_type), obj_id, param=param)
        return obj

    def find(self, obj_id: str) -> Obj | None:
        """Any object by id, for `expand[]`."""
        for prefix, obj_type in _PREFIXES.items():
            if obj_id.startswith(prefix):
                obj = self.objects.get(obj_id)
                return obj if obj is not None and obj["object"] == obj_type else None
        return None

    def all(self, obj_type: str) -> list[Obj]:
        """Newest first, as Stripe lists."""
        return [self.objects[i] for i in reversed(self.order.get(obj_type, []))]

    def next_invoice_number(self) -> str:
        self.invoice_numbers += 1
        return f"LOOKOUT-{self.invoice_numbers:04d}"

    def snapshot(self, obj: Obj) -> Obj:
        return copy.deepcopy(obj)

    def take_fault(self, method: str, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.matches(method, path):
                fault.remaining -= 1
                return fault
        return None


def paginate(items: list[Obj], params: Obj, url: str) -> Obj:
    """Stripe's cursor pagination over a newest-first list."""
    limit = as_int(params.get("limit"), "limit", 10) or 10
    if not 1 <= limit <= 100:
        raise StripeError.invalid(
            "Invalid integer: limit must be between 1 and 100.", param="limit"
        )
    after, before = params.get("starting_after"), params.get("ending_before")
    ids = [o["id"] for o in items]
    if after:
        if after not in ids:
            raise StripeError.no_such("object", str(after), param="starting_after")
        items = items[ids.index(after) + 1 :]
    elif before:
        if before not in ids:
            raise StripeError.no_such("object", str(before), param="ending_before")
        items = items[: ids.index(before)][-limit:]
    page = items[:limit]
    return {"object": "list", "data": page, "has_more": len(items) > limit, "url": url}
