"""What happens in Stripe beyond a single API call: paying a Checkout Session, renewals,
failed payments, cancellation. Shared by the API, the hosted checkout page and the test controls.

Events follow Stripe's order for the same flow (the subscription is created `incomplete` and
updated to `active` once the first invoice is paid), so receivers meet the same reorderings.
"""

from __future__ import annotations

import copy
from typing import Protocol

from app.stripe_emulator import objects
from app.stripe_emulator.errors import StripeError
from app.stripe_emulator.state import EmulatorState, Obj

_LIVE = ("active", "past_due", "unpaid", "paused", "incomplete", "trialing")
# What Stripe moves a subscription to from each status (the `status` control refuses the rest):
# the first payment settles or expires; a failed renewal makes it past_due, whose retries end
# in unpaid (or canceled); paying makes it active again. `paused` is what a trial that ends
# without a payment method becomes; the emulator lets an active subscription stand in for it.
# Ending one goes through cancellation (`cancel_now`), never through this table.
_TRANSITIONS: dict[str, frozenset[str]] = {
    "incomplete": frozenset({"active", "incomplete_expired"}),
    "trialing": frozenset({"active", "past_due", "paused"}),
    "active": frozenset({"past_due", "paused"}),
    "past_due": frozenset({"active", "unpaid"}),
    "unpaid": frozenset({"active"}),
    "paused": frozenset({"active"}),
    "canceled": frozenset(),
    "incomplete_expired": frozenset(),
}
_ENDED = ("canceled", "incomplete_expired")


class Emit(Protocol):
    def __call__(self, event_type: str, obj: Obj, previous: Obj | None = None) -> Obj: ...


def _items(sub: Obj) -> Obj:
    item: Obj = sub["items"]["data"][0]
    return item


def _set(sub: Obj, previous: Obj, **changes: object) -> None:
    for key, value in changes.items():
        if sub.get(key) != value:
            previous.setdefault(key, copy.deepcopy(sub.get(key)))
            sub[key] = value


def _new_invoice(state: EmulatorState, emit: Emit, sub: Obj, reason: str) -> Obj:
    customer = state.get("customer", sub["customer"])
    now = state.now()
    inv = objects.invoice(
        objects.stripe_id("in"), now, sub=sub, customer=customer, billing_reason=reason,
        number=state.next_invoice_number(),
    )  # fmt: skip
    state.put(inv)
    emit("invoice.created", inv)
    inv["status"] = "open"
    inv["effective_at"] = now
    inv["status_transitions"]["finalized_at"] = now
    emit("invoice.finalized", inv, {"status": "draft"})
    return inv


def _pay_invoice(state: EmulatorState, emit: Emit, inv: Obj) -> None:
    previous = {"amount_paid": inv["amount_paid"], "amount_remaining": inv["amount_remaining"]}
    previous.update({"status": inv["status"], "attempted": inv["attempted"]})
    inv.update(
        status="paid", amount_paid=inv["amount_due"], amount_remaining=0, attempted=True,
        attempt_count=inv["attempt_count"] + 1, next_payment_attempt=None,
    )  # fmt: skip
    inv["status_transitions"]["paid_at"] = state.now()
    emit("invoice.paid", inv, previous)
    emit("invoice.payment_succeeded", inv, previous)


def _fail_invoice(state: EmulatorState, emit: Emit, inv: Obj, *, action_required: bool) -> None:
    previous = {"attempted": inv["attempted"], "attempt_count": inv["attempt_count"]}
    inv.update(
        attempted=True, attempt_count=inv["attempt_count"] + 1,
        next_payment_attempt=state.now() + 3 * 86400,
    )  # fmt: skip
    emit(
        "invoice.payment_action_required" if action_required else "invoice.payment_failed",
        inv,
        previous,
    )


def _set_status(emit: Emit, sub: Obj, status: str, **more: object) -> None:
    previous: Obj = {}
    _set(sub, previous, status=status, **more)
    if previous:
        emit("customer.subscription.updated", sub, previous)


def complete_checkout(
    state: EmulatorState, emit: Emit, session_id: str, *, email: str | None, async_payment: bool
) -> Obj:
    """The customer pays: customer, subscription and first invoice, then the session completes.

    In Stripe's current order (API versions 2025-03-31 and later) the subscription is created
    only once the customer has paid: born `active` with its paid first invoice, never
    `incomplete`, and the session has no subscription before that. A delayed payment method (a
    bank debit) completes the session unpaid: its subscription is `incomplete` until the
    payment settles (`async_payment_result`)."""
    session = state.get("checkout.session", session_id)
    if session["status"] == "complete":
        return session
    if session["status"] != "open":
        raise StripeError.invalid(
            f"This Checkout Session is {session['status']}; it cannot be paid."
        )
    now = state.now()
    if session["customer"]:
        cust = state.get("customer", session["customer"])
    else:
        address = email or session["customer_email"] or "customer@example.com"
        cust = state.put(objects.customer(objects.stripe_id("cus", 14), now, address, None, {}))
        emit("customer.created", cust)
    price_id, _quantity = state.session_items[session_id][0]
    sub_meta = dict(state.session_subscription_data.get(session_id, {}).get("metadata", {}))
    sub, inv = start_subscription(
        state, emit, cust, state.get("price", price_id), sub_meta, paid=not async_payment
    )
    details = {"address": None, "email": cust["email"], "name": cust["name"], "phone": None}
    details.update(
        {"tax_exempt": "none", "tax_ids": [], "business_name": None, "individual_name": None}
    )
    session.update(
        customer=cust["id"], customer_details=details, subscription=sub["id"], invoice=inv["id"]
    )
    session["status"] = "complete"
    session["url"] = None  # Stripe keeps `url` only while the session is open
    if not async_payment:
        session["payment_status"] = "paid"
    emit("checkout.session.completed", session)
    return session


def start_subscription(
    state: EmulatorState, emit: Emit, cust: Obj, price: Obj, meta: Obj, *, paid: bool
) -> tuple[Obj, Obj]:
    """A new subscription with its first invoice, paid (the subscription `active`) or left
    open (`incomplete`); answers both."""
    now = state.now()
    interval = price["recurring"] or {"interval": "month", "interval_count": 1}
    end = objects.add_interval(now, interval["interval"], interval["interval_count"])
    sub_id = objects.stripe_id("sub")
    item = objects.subscription_item(objects.stripe_id("si", 14), sub_id, now, price, now, end)
    status = "active" if paid else "incomplete"
    sub = state.put(
        objects.subscription(
            sub_id, now, customer_id=cust["id"], item=item, meta=dict(meta), status=status
        )
    )
    inv = _new_invoice(state, emit, sub, "subscription_create")
    sub["latest_invoice"] = inv["id"]
    emit("customer.subscription.created", sub)
    if paid:
        _pay_invoice(state, emit, inv)
    return sub, inv


def async_payment_result(
    state: EmulatorState, emit: Emit, session_id: str, *, succeeded: bool
) -> Obj:
    """A delayed payment method (a bank debit) settles or fails after the session completed.
    A failed one ends the subscription: its invoice is voided and it is `incomplete_expired`
    (terminal; nothing will ever charge it)."""
    session = state.get("checkout.session", session_id)
    if session["status"] != "complete" or session["payment_status"] != "unpaid":
        raise StripeError.invalid("Only a completed, unpaid Checkout Session awaits a payment.")
    inv = state.get("invoice", session["invoice"])
    sub = state.get("subscription", session["subscription"])
    if sub["status"] != "incomplete":
        raise StripeError.invalid(
            f"Subscription {sub['id']} is {sub['status']}; its first payment was settled already."
        )
    if succeeded:
        _pay_invoice(state, emit, inv)
        _set_status(emit, sub, "active")
        session["payment_status"] = "paid"
        emit("checkout.session.async_payment_succeeded", session)
    else:
        _fail_invoice(state, emit, inv, action_required=False)
        previous = {"status": inv["status"]}
        inv.update(status="void", next_payment_attempt=None, amount_remaining=0)
        inv["status_transitions"]["voided_at"] = state.now()
        emit("invoice.voided", inv, previous)
        _set_status(emit, sub, "incomplete_expired", ended_at=state.now())
        emit("checkout.session.async_payment_failed", session)
    return session


def expire_checkout(state: EmulatorState, emit: Emit, session_id: str) -> Obj:
    session = state.get("checkout.session", session_id, param="session")
    if session["status"] != "open":
        raise StripeError.invalid(
            f'Only Checkout Sessions with a status in ["open"] can be expired. This session '
            f'has status "{session["status"]}".'
        )
    session["status"] = "expired"
    session["url"] = None
    emit("checkout.session.expired", session)
    return session


def set_cancel_at_period_end(
    state: EmulatorState, emit: Emit, sub: Obj, value: bool, *, details: Obj | None = None
) -> Obj:
    previous: Obj = {}
    end = _items(sub)["current_period_end"] if value else None
    cancellation = dict(sub["cancellation_details"])
    cancellation.update(details or {})
    cancellation["reason"] = "cancellation_requested" if value else None
    _set(
        sub, previous, cancel_at_period_end=value, cancel_at=end, cancellation_details=cancellation
    )
    if previous:
        emit("customer.subscription.updated", sub, previous)
    return sub


def cancel_now(
    state: EmulatorState, emit: Emit, sub_id: str, *, reason: str = "cancellation_requested"
) -> Obj:
    sub = state.get("subscription", sub_id, param="subscription_exposed_id")
    if sub["status"] == "canceled":
        # What Stripe answers: a canceled subscription is as good as deleted.
        raise StripeError.no_such("subscription", sub_id, param="subscription_exposed_id")
    now = state.now()
    sub.update(status="canceled", canceled_at=now, ended_at=now)
    sub["cancellation_details"] = {**sub["cancellation_details"], "reason": reason}
    emit("customer.subscription.deleted", sub)
    return sub


def renew(state: EmulatorState, emit: Emit, sub_id: str, *, outcome: str) -> Obj:
    """The end of the period: the subscription ends (if so asked) or a new invoice is charged."""
    sub = state.get("subscription", sub_id)
    # An incomplete subscription has not begun its first period; a paused one bills nothing.
    if sub["status"] not in _LIVE or sub["status"] in ("incomplete", "paused"):
        raise StripeError.invalid(f"Subscription {sub_id} is {sub['status']}; it does not renew.")
    item = _items(sub)
    if sub["cancel_at_period_end"]:
        sub.update(status="canceled", canceled_at=state.now(), ended_at=item["current_period_end"])
        emit("customer.subscription.deleted", sub)
        return sub
    previous: Obj = {"items": copy.deepcopy(sub["items"]), "latest_invoice": sub["latest_invoice"]}
    recurring = item["price"]["recurring"] or {"interval": "month", "interval_count": 1}
    start = item["current_period_end"]
    item["current_period_start"] = start
    item["current_period_end"] = objects.add_interval(
        start, recurring["interval"], recurring["interval_count"]
    )
    inv = _new_invoice(state, emit, sub, "subscription_cycle")
    sub["latest_invoice"] = inv["id"]
    if outcome == "paid":
        _pay_invoice(state, emit, inv)
        _set(sub, previous, status="active")
    else:
        _fail_invoice(state, emit, inv, action_required=outcome == "action_required")
        _set(sub, previous, status="past_due")
    emit("customer.subscription.updated", sub, previous)
    return sub


def pay_latest_invoice(state: EmulatorState, emit: Emit, sub_id: str) -> Obj:
    sub = state.get("subscription", sub_id)
    refuse_ended(sub, "paid for")
    inv = state.get("invoice", sub["latest_invoice"])
    if inv["status"] != "open":
        raise StripeError.invalid(
            f"Invoice {inv['id']} is {inv['status']}; only an open one can be paid."
        )
    _pay_invoice(state, emit, inv)
    _set_status(emit, sub, "active")
    return sub


def set_status(state: EmulatorState, emit: Emit, sub_id: str, status: str) -> Obj:
    sub = state.get("subscription", sub_id)
    before = sub["status"]
    allowed = _TRANSITIONS.get(before, frozenset())
    if status != before and status not in allowed:
        choices = ", ".join(sorted(allowed)) or "nothing: it has ended"
        raise StripeError.invalid(
            f"Stripe cannot move a subscription from {before} to {status}; from {before} it "
            f"goes to {choices}.",
            param="status",
        )
    _set_status(emit, sub, status)
    if status == "paused" and before != "paused":
        emit("customer.subscription.paused", sub)
    elif before == "paused" and status != "paused":
        emit("customer.subscription.resumed", sub)
    return sub


def refuse_ended(sub: Obj, action: str) -> None:
    """An ended subscription (canceled, incomplete_expired) cannot change any more."""
    if sub["status"] in _ENDED:
        raise StripeError.invalid(
            f"Subscription {sub['id']} is {sub['status']}; it cannot be {action}."
        )


def attach_payment_method(
    state: EmulatorState, emit: Emit, customer_id: str, *, outcome: str = "succeeds",
    default: bool = True,
) -> Obj:  # fmt: skip
    """The customer saves a card (in the Portal, say): a SetupIntent succeeds and, with
    `default`, the card becomes the customer's default for invoices. `outcome` is what
    charging it will do: "succeeds", "declined" or "requires_action" (SCA)."""
    if outcome not in CARD_OUTCOMES:
        raise StripeError.invalid(f"card must be one of {', '.join(CARD_OUTCOMES)}")
    cust = state.get("customer", customer_id)
    pm = objects.stripe_id("pm")
    state.card_outcomes[pm] = outcome
    seti = objects.setup_intent(objects.stripe_id("seti"), state.now(), customer_id, pm)
    state.put(seti)
    emit("setup_intent.succeeded", seti)
    if default:
        previous = {"invoice_settings": copy.deepcopy(cust["invoice_settings"])}
        cust["invoice_settings"]["default_payment_method"] = pm
        emit("customer.updated", cust, previous)
    return seti


CARD_OUTCOMES = ("succeeds", "declined", "requires_action")


def fail_payment(state: EmulatorState, emit: Emit, inv: Obj, *, action_required: bool) -> None:
    """A charge of `inv` failed, or waits for the customer to authenticate."""
    _fail_invoice(state, emit, inv, action_required=action_required)
