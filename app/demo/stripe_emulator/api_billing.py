"""`/v1/checkout/sessions`, `/v1/subscriptions`, `/v1/invoices` and `/v1/events`."""

from __future__ import annotations

import fnmatch

from app.demo.stripe_emulator import flows, objects
from app.demo.stripe_emulator.api import ApiContext
from app.demo.stripe_emulator.errors import StripeError
from app.demo.stripe_emulator.forms import (
    as_bool,
    as_dict,
    as_int,
    as_list,
    as_str,
    as_str_dict,
    reject_unknown,
)
from app.demo.stripe_emulator.state import Obj, paginate

_SESSION_PARAMS = (
    "mode", "line_items", "success_url", "cancel_url", "customer", "customer_email",
    "client_reference_id", "metadata", "subscription_data", "expires_at", "locale",
    "payment_method_types", "allow_promotion_codes", "billing_address_collection", "ui_mode",
)  # fmt: skip
_DAY = 86400


def _url(value: str | None, param: str) -> str | None:
    if value is not None and not value.startswith(("http://", "https://")):
        raise StripeError.invalid("Not a valid URL", param=param, code="url_invalid")
    return value


def create_session(ctx: ApiContext) -> Obj:
    p, state = ctx.params, ctx.state
    reject_unknown(p, _SESSION_PARAMS)
    mode = as_str(p.get("mode"), "mode")
    if mode is None:
        raise StripeError.missing("mode")
    if mode != "subscription":
        raise StripeError.invalid(
            f"The emulator supports mode=subscription only, not {mode}.", param="mode"
        )
    line_items = as_list(p.get("line_items"), "line_items")
    if not line_items:
        raise StripeError.invalid(
            "`line_items` is required in `subscription` mode.", param="line_items"
        )
    items: list[tuple[str, int]] = []
    for index, raw in enumerate(line_items):
        item = as_dict(raw, f"line_items[{index}]")
        price_id = as_str(item.get("price"), f"line_items[{index}][price]")
        if price_id is None:
            raise StripeError.missing(f"line_items[{index}][price]")
        price = state.get("price", price_id, param=f"line_items[{index}][price]")
        if price["recurring"] is None or not price["active"]:
            raise StripeError.invalid(
                "You must provide at least one recurring price in `subscription` mode when "
                "using prices.",
                param=f"line_items[{index}][price]",
            )
        items.append(
            (price_id, as_int(item.get("quantity"), f"line_items[{index}][quantity]", 1) or 1)
        )
    customer = as_str(p.get("customer"), "customer")
    email = as_str(p.get("customer_email"), "customer_email")
    if customer and email:
        raise StripeError.invalid(
            "You may only specify one of these parameters: customer, customer_email."
        )
    if customer:
        state.get("customer", customer, param="customer")
    now = state.now()
    expires_at = as_int(p.get("expires_at"), "expires_at", now + _DAY) or now + _DAY
    if not now + 1800 <= expires_at <= now + _DAY:
        raise StripeError.invalid(
            "The `expires_at` timestamp must be between 30 minutes and 24 hours from "
            "Checkout Session creation.",
            param="expires_at",
        )
    first = state.get("price", items[0][0])
    sid = objects.stripe_id("cs_test", 58)
    session = objects.checkout_session(
        sid, now, mode=mode, url=f"{state.public_url}/checkout/{sid}",
        success_url=_url(as_str(p.get("success_url"), "success_url"), "success_url"),
        cancel_url=_url(as_str(p.get("cancel_url"), "cancel_url"), "cancel_url"),
        customer_id=customer, customer_email=email,
        client_reference_id=as_str(p.get("client_reference_id"), "client_reference_id"),
        meta=as_str_dict(p.get("metadata"), "metadata"), currency=first["currency"],
        amount=sum(state.get("price", pid)["unit_amount"] * qty for pid, qty in items),
        expires_at=expires_at,
    )  # fmt: skip
    session["locale"] = as_str(p.get("locale"), "locale")
    sub_data = as_dict(p.get("subscription_data"), "subscription_data")
    reject_unknown(sub_data, ("metadata", "description"))
    state.session_subscription_data[sid] = {
        "metadata": as_str_dict(sub_data.get("metadata"), "subscription_data[metadata]")
    }
    state.session_items[sid] = items
    return state.put(session)


def retrieve_session(ctx: ApiContext) -> Obj:
    return ctx.state.get("checkout.session", ctx.path_params["id"], param="session")


def expire_session(ctx: ApiContext) -> Obj:
    reject_unknown(ctx.params, ())
    return flows.expire_checkout(ctx.state, ctx.emit, ctx.path_params["id"])


def list_sessions(ctx: ApiContext) -> Obj:
    p = ctx.params
    reject_unknown(
        p, ("customer", "subscription", "status", "limit", "starting_after", "ending_before")
    )
    items = ctx.state.all("checkout.session")
    for field in ("customer", "subscription", "status"):
        if p.get(field):
            items = [o for o in items if o[field] == p[field]]
    return paginate(items, p, "/v1/checkout/sessions")


def session_line_items(ctx: ApiContext) -> Obj:
    sid = ctx.path_params["id"]
    ctx.state.get("checkout.session", sid, param="session")
    data = []
    for price_id, quantity in ctx.state.session_items[sid]:
        price = ctx.state.get("price", price_id)
        amount = price["unit_amount"] * quantity
        data.append({
            "id": objects.stripe_id("li", 24), "object": "item", "adjustable_quantity": None,
            "amount_discount": 0,
            "amount_subtotal": amount, "amount_tax": 0, "amount_total": amount,
            "currency": price["currency"],
            "description": ctx.state.get("product", price["product"])["name"],
            "metadata": {}, "price": price, "quantity": quantity,
        })  # fmt: skip
    return paginate(data, ctx.params, f"/v1/checkout/sessions/{sid}/line_items")


def retrieve_subscription(ctx: ApiContext) -> Obj:
    return ctx.state.get("subscription", ctx.path_params["id"], param="subscription_exposed_id")


def update_subscription(ctx: ApiContext) -> Obj:
    p = ctx.params
    reject_unknown(
        p,
        (
            "cancel_at", "cancel_at_period_end", "metadata", "cancellation_details",
            "description", "items", "proration_behavior",
        ),
    )  # fmt: skip
    sub = ctx.state.get("subscription", ctx.path_params["id"], param="subscription_exposed_id")
    if sub["status"] == "canceled" and set(p) - {"metadata", "cancellation_details", "expand"}:
        raise StripeError.invalid(
            "A canceled subscription can only update its cancellation_details and metadata."
        )
    if "metadata" in p:
        previous_meta = dict(sub["metadata"])
        meta = (
            {}
            if p["metadata"] == ""
            else {**sub["metadata"], **as_str_dict(p["metadata"], "metadata")}
        )
        sub["metadata"] = {k: v for k, v in meta.items() if v != ""}
        if sub["metadata"] != previous_meta:
            ctx.emit("customer.subscription.updated", sub, {"metadata": previous_meta})
    if "items" in p:  # a price change (issue 13), prorated as `proration_behavior` says
        flows.change_price(
            ctx.state,
            ctx.emit,
            sub,
            as_list(p["items"], "items"),
            as_str(p.get("proration_behavior"), "proration_behavior") or "create_prorations",
        )
    elif "proration_behavior" in p:
        raise StripeError.invalid(
            "proration_behavior is only valid with a change of items.", param="proration_behavior"
        )
    details = as_str_dict(p.get("cancellation_details"), "cancellation_details")
    if "cancel_at" in p and "cancel_at_period_end" in p:
        raise StripeError.invalid(
            "You may only specify one of these parameters: cancel_at, cancel_at_period_end."
        )
    if "cancel_at" in p:
        at = flows.resolve_cancel_at(ctx.state, sub, p["cancel_at"])
        flows.set_cancel_at(ctx.state, ctx.emit, sub, at, details=details)
    elif "cancel_at_period_end" in p:
        value = as_bool(p["cancel_at_period_end"], "cancel_at_period_end")
        flows.set_cancel_at_period_end(ctx.state, ctx.emit, sub, value, details=details)
    elif details:
        sub["cancellation_details"] = {**sub["cancellation_details"], **details}
    return sub


def cancel_subscription(ctx: ApiContext) -> Obj:
    p = ctx.params
    reject_unknown(p, ("invoice_now", "prorate", "cancellation_details"))
    sub = flows.cancel_now(ctx.state, ctx.emit, ctx.path_params["id"])
    details = as_str_dict(p.get("cancellation_details"), "cancellation_details")
    sub["cancellation_details"].update(details)
    return sub


def list_subscriptions(ctx: ApiContext) -> Obj:
    p = ctx.params
    reject_unknown(p, ("customer", "price", "status", "limit", "starting_after", "ending_before"))
    items = ctx.state.all("subscription")
    status = as_str(p.get("status"), "status")
    if status is None:  # Stripe leaves canceled subscriptions out unless asked
        items = [o for o in items if o["status"] != "canceled"]
    elif status != "all":
        items = [o for o in items if o["status"] == status]
    if p.get("customer"):
        items = [o for o in items if o["customer"] == p["customer"]]
    if p.get("price"):
        items = [o for o in items if o["items"]["data"][0]["price"]["id"] == p["price"]]
    return paginate(items, p, "/v1/subscriptions")


def retrieve_invoice(ctx: ApiContext) -> Obj:
    return ctx.state.get("invoice", ctx.path_params["id"], param="invoice")


def list_invoices(ctx: ApiContext) -> Obj:
    p = ctx.params
    reject_unknown(
        p, ("customer", "subscription", "status", "limit", "starting_after", "ending_before")
    )
    items = ctx.state.all("invoice")
    if p.get("subscription"):
        items = [
            o
            for o in items
            if o["parent"]["subscription_details"]["subscription"] == p["subscription"]
        ]
    for field in ("customer", "status"):
        if p.get(field):
            items = [o for o in items if o[field] == p[field]]
    return paginate(items, p, "/v1/invoices")


def retrieve_event(ctx: ApiContext) -> Obj:
    return ctx.state.get("event", ctx.path_params["id"])


def list_events(ctx: ApiContext) -> Obj:
    p = ctx.params
    reject_unknown(p, ("type", "types", "limit", "starting_after", "ending_before"))
    items = ctx.state.all("event")
    types = as_list(p.get("types"), "types") or ([p["type"]] if p.get("type") else [])
    if types:  # `customer.subscription.*` as Stripe allows
        items = [o for o in items if any(fnmatch.fnmatchcase(o["type"], str(t)) for t in types)]
    return paginate(items, p, "/v1/events")


# -- creating a subscription for a saved payment method (issue 13) ------------------------------
_CREATE_SUBSCRIPTION_PARAMS = (
    "customer", "items", "metadata", "payment_behavior", "default_payment_method",
    "description", "off_session",
)  # fmt: skip
_PAYMENT_BEHAVIORS = ("allow_incomplete", "error_if_incomplete", "default_incomplete")


def create_subscription(ctx: ApiContext) -> Obj:
    """`POST /v1/subscriptions`: charged at once to the customer's default payment method.
    With `payment_behavior=error_if_incomplete` a payment that fails or needs the customer to
    authenticate creates nothing and answers 402, as Stripe does."""
    p, state = ctx.params, ctx.state
    reject_unknown(p, _CREATE_SUBSCRIPTION_PARAMS)
    customer_id = as_str(p.get("customer"), "customer")
    if customer_id is None:
        raise StripeError.missing("customer")
    cust = state.get("customer", customer_id, param="customer")
    items = as_list(p.get("items"), "items")
    if len(items) != 1:
        raise StripeError.invalid("The emulator supports exactly one item.", param="items")
    price_id = as_str(as_dict(items[0], "items[0]").get("price"), "items[0][price]")
    if price_id is None:
        raise StripeError.missing("items[0][price]")
    price = state.get("price", price_id, param="items[0][price]")
    if price["recurring"] is None or not price["active"]:
        raise StripeError.invalid(
            "The price must be an active recurring price.", param="items[0][price]"
        )
    behavior = as_str(p.get("payment_behavior"), "payment_behavior") or "allow_incomplete"
    if behavior not in _PAYMENT_BEHAVIORS:
        raise StripeError.invalid(
            f"Invalid payment_behavior: must be one of {', '.join(_PAYMENT_BEHAVIORS)}",
            param="payment_behavior",
        )
    meta = as_str_dict(p.get("metadata"), "metadata")
    own_pm = as_str(p.get("default_payment_method"), "default_payment_method")
    pm = own_pm or cust["invoice_settings"]["default_payment_method"]
    if pm is None and behavior != "default_incomplete":
        raise StripeError.invalid(
            "This customer has no attached payment source or default payment method. Please "
            "consider adding a default payment method.",
            code="resource_missing",
        )
    outcome = state.card_outcomes.get(pm or "", "succeeds")
    if behavior == "error_if_incomplete" and outcome != "succeeds":
        raise _card_error(outcome)
    paid = pm is not None and outcome == "succeeds" and behavior != "default_incomplete"
    sub, inv = flows.start_subscription(ctx.state, ctx.emit, cust, price, meta, paid=paid)
    sub["default_payment_method"] = own_pm
    if pm is not None and not paid and behavior == "allow_incomplete":
        flows.fail_payment(state, ctx.emit, inv, action_required=outcome != "declined")
    return sub


def _card_error(outcome: str) -> StripeError:
    if outcome == "requires_action":
        return StripeError(
            402,
            "This payment requires the customer to authenticate (3D Secure); confirm it "
            "on-session, for example in Checkout.",
            type="card_error",
            code="authentication_required",
        )
    return StripeError(402, "Your card was declined.", type="card_error", code="card_declined")
