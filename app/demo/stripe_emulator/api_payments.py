"""`/v1/payment_intents`, `/v1/charges`, `/v1/invoice_payments` and `/v1/refunds`: the money
behind invoices, read-only except for refunds."""

from __future__ import annotations

from app.demo.stripe_emulator import flows
from app.demo.stripe_emulator.api import ApiContext
from app.demo.stripe_emulator.forms import as_dict, as_int, as_str, as_str_dict, reject_unknown
from app.demo.stripe_emulator.state import Obj, paginate

_PAGING = ("limit", "starting_after", "ending_before")


def retrieve_payment_intent(ctx: ApiContext) -> Obj:
    return ctx.state.get("payment_intent", ctx.path_params["id"], param="intent")


def retrieve_charge(ctx: ApiContext) -> Obj:
    return ctx.state.get("charge", ctx.path_params["id"], param="charge")


def _listed(ctx: ApiContext, obj_type: str, filters: tuple[str, ...], url: str) -> Obj:
    """A newest-first page of `obj_type`, filtered by equality on the given fields."""
    p = ctx.params
    reject_unknown(p, (*filters, *_PAGING))
    items = ctx.state.all(obj_type)
    for field in filters:
        if p.get(field):
            items = [o for o in items if o[field] == as_str(p[field], field)]
    return paginate(items, p, url)


def list_charges(ctx: ApiContext) -> Obj:
    return _listed(ctx, "charge", ("customer", "payment_intent"), "/v1/charges")


def retrieve_invoice_payment(ctx: ApiContext) -> Obj:
    return ctx.state.get("invoice_payment", ctx.path_params["id"], param="invoice_payment")


def list_invoice_payments(ctx: ApiContext) -> Obj:
    p = ctx.params
    reject_unknown(p, ("invoice", "status", "payment", *_PAGING))
    items = ctx.state.all("invoice_payment")
    invoice = as_str(p.get("invoice"), "invoice")
    if invoice:
        items = [o for o in items if o["invoice"] == invoice]
    status = as_str(p.get("status"), "status")
    if status:
        items = [o for o in items if o["status"] == status]
    payment = as_dict(p.get("payment"), "payment")
    reject_unknown(payment, ("type", "payment_intent", "payment_record"))
    for field in ("type", "payment_intent"):
        if payment.get(field):
            items = [o for o in items if o["payment"].get(field) == payment[field]]
    return paginate(items, p, "/v1/invoice_payments")


def create_refund(ctx: ApiContext) -> Obj:
    p = ctx.params
    reject_unknown(p, ("charge", "payment_intent", "amount", "reason", "metadata"))
    return flows.create_refund(
        ctx.state,
        ctx.emit,
        charge_id=as_str(p.get("charge"), "charge"),
        payment_intent_id=as_str(p.get("payment_intent"), "payment_intent"),
        amount=as_int(p.get("amount"), "amount"),
        reason=as_str(p.get("reason"), "reason"),
        metadata=as_str_dict(p.get("metadata"), "metadata"),
    )


def retrieve_refund(ctx: ApiContext) -> Obj:
    return ctx.state.get("refund", ctx.path_params["id"], param="refund")


def list_refunds(ctx: ApiContext) -> Obj:
    return _listed(ctx, "refund", ("charge", "payment_intent"), "/v1/refunds")
