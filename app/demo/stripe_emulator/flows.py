"""What happens in Stripe beyond a single API call: paying a Checkout Session, renewals,
failed payments, cancellation. Shared by the API, the hosted checkout page and the test controls.

Events follow Stripe's order for the same flow (the subscription is created `incomplete` and
updated to `active` once the first invoice is paid), so receivers meet the same reorderings.
"""

from __future__ import annotations

import copy
import secrets
from typing import Protocol

from app.demo.stripe_emulator import objects
from app.demo.stripe_emulator.errors import StripeError
from app.demo.stripe_emulator.state import EmulatorState, Obj

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
    # Stripe gives a finalized invoice its hosted page; the emulator serves one (portal.py).
    inv["hosted_invoice_url"] = f"{state.public_url}/i/{inv['id']}"
    emit("invoice.finalized", inv, {"status": "draft"})
    _open_payment(state, emit, inv)
    return inv


def _pay_invoice(state: EmulatorState, emit: Emit, inv: Obj) -> None:
    previous = {"amount_paid": inv["amount_paid"], "amount_remaining": inv["amount_remaining"]}
    previous.update({"status": inv["status"], "attempted": inv["attempted"]})
    inv.update(
        status="paid", amount_paid=inv["amount_due"], amount_remaining=0, attempted=True,
        attempt_count=inv["attempt_count"] + 1, next_payment_attempt=None,
    )  # fmt: skip
    inv["status_transitions"]["paid_at"] = state.now()
    _settle_payment(state, emit, inv)
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
    """`cancel_at_period_end`: true schedules the end at the period's end (Stripe shows that
    date in `cancel_at` too); false undoes only that. A `cancel_at` set on its own (as the
    Customer Portal does in flexible billing mode) stays: clearing it takes `cancel_at=""`."""
    if not value and not sub["cancel_at_period_end"]:
        return sub
    end = min(i["current_period_end"] for i in sub["items"]["data"]) if value else None
    return _schedule_cancellation(emit, sub, at_period_end=value, at=end, details=details)


def resolve_cancel_at(state: EmulatorState, sub: Obj, raw: object) -> int | None:
    """The `cancel_at` parameter: a future timestamp, `min_period_end` or `max_period_end`
    (resolved now, to the earliest or latest item period end), or `""` to unset it."""
    ends: list[int] = [i["current_period_end"] for i in sub["items"]["data"]]
    if raw == "":
        return None
    if raw == "min_period_end":
        return min(ends)
    if raw == "max_period_end":
        return max(ends)
    if not isinstance(raw, str) or not raw.isdigit():
        raise StripeError.invalid(
            f"Invalid cancel_at: {raw!r}. Pass a Unix timestamp, min_period_end, max_period_end, "
            'or "" to unset it.',
            param="cancel_at",
        )
    at = int(raw)
    if at <= state.now():
        raise StripeError.invalid(
            "Invalid cancel_at: the timestamp must be in the future.", param="cancel_at"
        )
    return at


def set_cancel_at(
    state: EmulatorState, emit: Emit, sub: Obj, at: int | None, *, details: Obj | None = None
) -> Obj:
    """`cancel_at`: the subscription ends at `at`; None unsets it, and with it a cancellation
    scheduled by `cancel_at_period_end` (whose date `cancel_at` shows)."""
    return _schedule_cancellation(emit, sub, at_period_end=False, at=at, details=details)


def _schedule_cancellation(
    emit: Emit, sub: Obj, *, at_period_end: bool, at: int | None, details: Obj | None
) -> Obj:
    previous: Obj = {}
    cancellation = dict(sub["cancellation_details"])
    cancellation.update(details or {})
    cancellation["reason"] = "cancellation_requested" if at is not None else None
    _set(
        sub,
        previous,
        cancel_at_period_end=at_period_end,
        cancel_at=at,
        cancellation_details=cancellation,
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
    period_end, ends_at = item["current_period_end"], sub["cancel_at"]
    if sub["cancel_at_period_end"] or (ends_at is not None and ends_at <= period_end):
        ended = min(ends_at or period_end, period_end)
        sub.update(status="canceled", canceled_at=state.now(), ended_at=ended)
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


def update_default_payment_method(
    state: EmulatorState, emit: Emit, customer_id: str, *, last4: str
) -> Obj:
    """A new card saved in the Customer Portal: confirmed by a SetupIntent, attached to the
    customer and made the default for its invoices, with the events Stripe sends for each."""
    customer = state.get("customer", customer_id)
    now = state.now()
    pm = state.put(
        objects.payment_method(
            objects.stripe_id("pm"), now, customer_id=customer_id, last4=last4,
            email=customer["email"],
        )
    )  # fmt: skip
    seti = state.put(objects.setup_intent(objects.stripe_id("seti"), now, customer_id, pm["id"]))
    emit("payment_method.attached", pm)
    emit("setup_intent.succeeded", seti)
    settings = customer["invoice_settings"]
    previous = {"invoice_settings": copy.deepcopy(settings)}
    settings["default_payment_method"] = pm["id"]
    emit("customer.updated", customer, previous)
    return pm


# -- payments and refunds ----------------------------------------------------------------------
# An invoice's money moves as Stripe moves it: finalizing opens a PaymentIntent and the
# invoice's default `invoice_payment`; paying it makes a Charge; a refund takes money back
# from that Charge, once at most for its whole amount.

REFUND_REASONS = ("duplicate", "fraudulent", "requested_by_customer")


def invoice_payments(state: EmulatorState, invoice_id: str) -> list[Obj]:
    return [p for p in state.all("invoice_payment") if p["invoice"] == invoice_id]


def _open_payment(state: EmulatorState, emit: Emit, inv: Obj) -> None:
    if inv["amount_due"] <= 0:
        return  # nothing to collect: Stripe marks such an invoice paid without a payment
    now = state.now()
    pi = objects.payment_intent(
        objects.stripe_id("pi"), now, amount=inv["amount_due"], currency=inv["currency"],
        customer_id=inv["customer"],
        description="Subscription creation"
        if inv["billing_reason"] == "subscription_create"
        else "Subscription update",
    )  # fmt: skip
    state.put(pi)
    state.put(objects.invoice_payment(objects.stripe_id("inpay"), now, inv=inv, pi_id=pi["id"]))
    emit("payment_intent.created", pi)


def _settle_payment(state: EmulatorState, emit: Emit, inv: Obj) -> None:
    """The card is charged for the invoice's default payment."""
    for payment in invoice_payments(state, inv["id"]):
        if payment["status"] != "open":
            continue
        pi = state.get("payment_intent", payment["payment"]["payment_intent"])
        now = state.now()
        pm = pi["payment_method"] or objects.stripe_id("pm")
        ch = objects.charge(
            objects.stripe_id("ch"), now, pi=pi, payment_method=pm, email=inv["customer_email"]
        )
        state.put(ch)
        pi.update(
            status="succeeded", amount_received=pi["amount"], latest_charge=ch["id"],
            payment_method=pm,
        )  # fmt: skip
        payment.update(status="paid", amount_paid=pi["amount"])
        payment["status_transitions"]["paid_at"] = now
        emit("charge.succeeded", ch)
        emit("payment_intent.succeeded", pi)
        emit("invoice_payment.paid", payment)


def create_refund(
    state: EmulatorState, emit: Emit, *, charge_id: str | None, payment_intent_id: str | None,
    amount: int | None, reason: str | None, metadata: Obj,
) -> Obj:  # fmt: skip
    if charge_id and payment_intent_id:
        raise StripeError.invalid(
            "You may only specify one of these parameters: charge, payment_intent."
        )
    if payment_intent_id:
        pi = state.get("payment_intent", payment_intent_id, param="payment_intent")
        if pi["status"] != "succeeded" or pi["latest_charge"] is None:
            raise StripeError.invalid(
                f"This PaymentIntent ({payment_intent_id}) does not have a successful charge "
                "to refund.",
                param="payment_intent",
            )
        charge_id = pi["latest_charge"]
    if not charge_id:
        raise StripeError.invalid(
            "One of the following params should be provided for this request: payment_intent "
            "or charge."
        )
    ch = state.get("charge", charge_id, param="charge")
    if reason is not None and reason not in REFUND_REASONS:
        raise StripeError.invalid(
            f"Invalid reason: must be one of {', '.join(REFUND_REASONS)}", param="reason"
        )
    remaining = ch["amount_captured"] - ch["amount_refunded"]
    if remaining <= 0:
        raise StripeError.invalid(
            f"Charge {ch['id']} has already been refunded.", code="charge_already_refunded"
        )
    amount = remaining if amount is None else amount
    if amount <= 0:
        raise StripeError.invalid("Invalid positive integer", param="amount")
    if amount > remaining:
        raise StripeError.invalid(
            f"Refund amount ({amount}) is greater than unrefunded amount on charge ({remaining})",
            param="amount",
            code="amount_too_large",
        )
    re = objects.refund(
        objects.stripe_id("re"), state.now(), ch=ch, amount=amount, reason=reason, meta=metadata
    )
    state.put(re)
    emit("refund.created", re)
    previous = {"amount_refunded": ch["amount_refunded"], "refunded": ch["refunded"]}
    ch["amount_refunded"] += amount
    ch["refunded"] = ch["amount_refunded"] >= ch["amount_captured"]
    emit("charge.refunded", ch, previous)
    # The card network's reference arrives later in live mode; the emulator has it at once.
    before = {"destination_details": copy.deepcopy(re["destination_details"])}
    re["destination_details"]["card"].update(
        reference=str(secrets.randbelow(10**23)).zfill(23), reference_status="available"
    )
    emit("refund.updated", re, before)
    emit("charge.refund.updated", re, before)
    return re


REFUND_FAILURE_REASONS = ("expired_or_canceled_card", "lost_or_stolen_card", "unknown")


def fail_refund(state: EmulatorState, emit: Emit, refund_id: str, *, reason: str) -> Obj:
    """The card's bank gives the money back to Stripe (a closed card): the refund fails, and
    the charge counts it as unrefunded again."""
    re = state.get("refund", refund_id, param="refund")
    if re["status"] not in ("pending", "succeeded"):
        raise StripeError.invalid(f"Refund {refund_id} is {re['status']}; it cannot fail.")
    if reason not in REFUND_FAILURE_REASONS:
        raise StripeError.invalid(f"reason must be one of {', '.join(REFUND_FAILURE_REASONS)}")
    previous = {"status": re["status"]}
    re.update(
        status="failed", failure_reason=reason, failure_balance_transaction=objects.stripe_id("txn")
    )
    ch = state.get("charge", re["charge"])
    ch["amount_refunded"] -= re["amount"]
    ch["refunded"] = False
    emit("refund.failed", re, previous)
    emit("refund.updated", re, previous)
    emit("charge.refund.updated", re, previous)
    return re


# -- price changes (issue 13) ------------------------------------------------------------------
_PRORATIONS = ("always_invoice", "create_prorations", "none")


def change_price(
    state: EmulatorState, emit: Emit, sub: Obj, items: list[object], proration_behavior: str
) -> Obj:
    """`POST /v1/subscriptions/{id}` with `items[0][id]` and `items[0][price]`: the item moves
    to the new price now; the rest of the period is prorated (Stripe's `proration_behavior`):
    `always_invoice` invoices the difference at once and charges it (a negative one is credited
    to the customer's balance), `create_prorations` leaves it for the next invoice (kept on the
    customer's balance here), `none` ignores it. The billing cycle stays (one interval only)."""
    if proration_behavior not in _PRORATIONS:
        raise StripeError.invalid(
            f"Invalid proration_behavior: must be one of {', '.join(_PRORATIONS)}",
            param="proration_behavior",
        )
    if sub["status"] not in _LIVE or sub["status"] == "incomplete":
        raise StripeError.invalid(
            f"Subscription {sub['id']} is {sub['status']}; its items cannot be changed."
        )
    if len(items) != 1 or not isinstance(items[0], dict):
        raise StripeError.invalid("Pass one item: items[0][id] and items[0][price].", param="items")
    wanted: Obj = items[0]
    item = _items(sub)
    if wanted.get("id") != item["id"]:
        raise StripeError.invalid(
            f"Invalid subscription_item id: {wanted.get('id')}", param="items[0][id]"
        )
    if not isinstance(wanted.get("price"), str):
        raise StripeError.missing("items[0][price]")
    new = state.get("price", wanted["price"], param="items[0][price]")
    old = item["price"]
    if not new["active"] or new["recurring"] is None:
        raise StripeError.invalid(
            "The price must be an active recurring price.", param="items[0][price]"
        )
    if new["currency"] != old["currency"]:
        raise StripeError.invalid(
            "The price's currency must match the subscription's.", param="items[0][price]"
        )
    interval = (new["recurring"]["interval"], new["recurring"].get("interval_count", 1))
    if interval != (old["recurring"]["interval"], old["recurring"].get("interval_count", 1)):
        raise StripeError.invalid(
            "The emulator keeps the billing cycle: the new price must have the same interval.",
            param="items[0][price]",
        )
    if new["id"] == old["id"]:
        return sub
    now = state.now()
    start, end = item["current_period_start"], item["current_period_end"]
    left = max(0, end - now) / max(1, end - start)
    difference = round((new["unit_amount"] - old["unit_amount"]) * left)
    previous: Obj = {"items": copy.deepcopy(sub["items"])}
    item["price"] = dict(new)
    item["plan"] = objects.plan_of(new)
    emit("customer.subscription.updated", sub, previous)
    customer = state.get("customer", sub["customer"])
    if proration_behavior == "always_invoice" and difference > 0:
        inv = _proration_invoice(state, emit, sub, customer, difference, start=now, end=end)
        sub["latest_invoice"] = inv["id"]
        _pay_invoice(state, emit, inv)
    elif proration_behavior != "none" and difference != 0:
        customer["balance"] += difference
    return sub


def _proration_invoice(
    state: EmulatorState, emit: Emit, sub: Obj, customer: Obj, amount: int, *, start: int, end: int
) -> Obj:
    inv = objects.invoice(
        objects.stripe_id("in"), state.now(), sub=sub, customer=customer,
        billing_reason="subscription_update", number=state.next_invoice_number(),
    )  # fmt: skip
    for key in ("amount_due", "amount_remaining", "subtotal", "subtotal_excluding_tax"):
        inv[key] = amount
    inv.update(total=amount, total_excluding_tax=amount, period_start=start, period_end=end)
    line = inv["lines"]["data"][0]
    line.update(amount=amount, subtotal=amount, period={"start": start, "end": end})
    line["description"] = "Remaining time on the new price, less unused time on the old one"
    line["parent"]["subscription_item_details"]["proration"] = True
    state.put(inv)
    emit("invoice.created", inv)
    inv.update(status="open", effective_at=state.now())
    inv["status_transitions"]["finalized_at"] = state.now()
    emit("invoice.finalized", inv, {"status": "draft"})
    return inv


CARD_OUTCOMES = ("succeeds", "declined", "requires_action")


def fail_payment(state: EmulatorState, emit: Emit, inv: Obj, *, action_required: bool) -> None:
    """A charge of `inv` failed, or waits for the customer to authenticate."""
    _fail_invoice(state, emit, inv, action_required=action_required)
