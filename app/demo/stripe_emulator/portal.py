"""The Customer Portal: `POST /v1/billing_portal/sessions` and the hosted page its `url` opens,
where a customer cancels or renews a subscription, updates the card and reads the invoices; and
the hosted invoice page that an invoice's `hosted_invoice_url` opens.

The portal acts as Stripe's does in flexible billing mode (the default for new subscriptions):
cancelling sets `cancel_at` to the end of the period and leaves `cancel_at_period_end` false.
Every action sends the webhooks Stripe sends for it. The pages carry no script, so that they
work under a strict Content-Security-Policy.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from html import escape
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from app.demo.stripe_emulator import flows, objects
from app.demo.stripe_emulator.api import ApiContext
from app.demo.stripe_emulator.api_billing import _url
from app.demo.stripe_emulator.checkout_page import _money, _page
from app.demo.stripe_emulator.forms import as_str, reject_unknown, required_str
from app.demo.stripe_emulator.state import EmulatorState, Obj
from app.demo.stripe_emulator.webhooks import WebhookDispatcher

__all__ = ["create_portal_session", "portal_routes"]

# The one portal configuration the emulator has (Stripe makes a default one per account).
DEFAULT_CONFIGURATION = "bpc_emulator_default"
# Subscriptions the portal shows: those that have not ended.
_SHOWN = ("active", "past_due", "unpaid", "paused", "trialing", "incomplete")
# Stripe's test card that is always declined.
_DECLINED = "4000000000000002"


def create_portal_session(ctx: ApiContext) -> Obj:
    p, state = ctx.params, ctx.state
    # `configuration`, `flow_data` and `on_behalf_of` are Stripe's too; the emulator has one
    # configuration and no flows, so it refuses them rather than ignore them.
    reject_unknown(p, ("customer", "return_url", "locale"))
    customer_id = required_str(p, "customer")
    state.get("customer", customer_id, param="customer")
    bps_id = objects.stripe_id("bps")
    secret = objects.stripe_id("test", 40)
    session = objects.billing_portal_session(
        bps_id, state.now(), customer_id=customer_id,
        return_url=_url(as_str(p.get("return_url"), "return_url"), "return_url"),
        url=f"{state.public_url}/p/session/{secret}", locale=as_str(p.get("locale"), "locale"),
        configuration=DEFAULT_CONFIGURATION,
    )  # fmt: skip
    return state.put(session)


def _date(ts: int | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).strftime("%b %-d, %Y")


def _subscription_row(state: EmulatorState, sub: Obj, action_base: str) -> str:
    item = sub["items"]["data"][0]
    price = item["price"]
    product = state.objects.get(price["product"], {}).get("name", price["product"])
    interval = (price["recurring"] or {}).get("interval", "month")
    sub_id = escape(sub["id"])
    if sub["cancel_at"] is not None:
        when = f"Cancels on {_date(sub['cancel_at'])}"
        action, label = "renew", "Renew subscription"
    else:
        when = f"Renews on {_date(item['current_period_end'])}"
        action, label = "cancel", "Cancel subscription"
    return (
        f"<section class=sub data-subscription='{sub_id}'>"
        f"<h2>{escape(product)}</h2>"
        f"<p>{_money(price['unit_amount'], price['currency'])} per {escape(interval)}"
        f" · <span class=muted>{escape(sub['status'])}</span></p>"
        f"<p class=when>{escape(when)}</p>"
        f"<form method=post action='{escape(action_base)}/subscriptions/{sub_id}/{action}'>"
        f"<button type=submit name=action value={action}>{label}</button></form></section>"
    )


def _card_line(state: EmulatorState, customer: Obj) -> str:
    pm_id = customer["invoice_settings"]["default_payment_method"]
    pm = state.objects.get(pm_id) if pm_id else None
    if pm is None:
        return "<p class=card-line>No card on file.</p>"
    card = pm["card"]
    return (
        f"<p class=card-line>{escape(card['brand'].title())} ending in {escape(card['last4'])},"
        f" expires {card['exp_month']:02d}/{card['exp_year']}</p>"
    )


def _invoice_rows(state: EmulatorState, customer_id: str) -> str:
    invoices = [
        i for i in state.all("invoice") if i["customer"] == customer_id and i["status"] != "draft"
    ]
    if not invoices:
        return "<p class=muted>No invoices yet.</p>"
    rows = "".join(
        f"<tr><td>{_date(i['created'])}</td><td>{escape(i['number'] or '')}</td>"
        f"<td>{_money(i['total'], i['currency'])}</td><td>{escape(i['status'])}</td>"
        f"<td><a href='{escape(i['hosted_invoice_url'] or '')}'>View</a></td></tr>"
        for i in invoices
    )
    return (
        "<table class=invoices><thead><tr><th>Date</th><th>Number</th><th>Amount</th>"
        f"<th>Status</th><th></th></tr></thead><tbody>{rows}</tbody></table>"
    )


def portal_routes(state: EmulatorState, webhooks: WebhookDispatcher) -> list[Route]:
    def emit(event_type: str, obj: Obj, previous: Obj | None = None) -> Obj:
        return webhooks.emit(event_type, obj, previous=previous)

    def find(secret: str) -> Obj | None:
        url = f"{state.public_url}/p/session/{secret}"
        return next((s for s in state.all("billing_portal.session") if s["url"] == url), None)

    def gone() -> HTMLResponse:
        return _page("Not found", "<h1>This billing portal link is not valid.</h1>", 404)

    async def show(request: Request) -> Response:
        secret = request.path_params["secret"]
        session = find(secret)
        if session is None:
            return gone()
        customer = state.get("customer", session["customer"])
        base = f"{state.public_url}/p/session/{secret}"
        subs = [
            s
            for s in state.all("subscription")
            if s["customer"] == customer["id"] and s["status"] in _SHOWN
        ]
        back = session["return_url"]
        rows = "".join(_subscription_row(state, s, base) for s in subs)
        body = (
            "<span class=badge>TEST MODE</span><h1>Manage your billing</h1>"
            f"<p class=muted>{escape(customer['email'] or customer['id'])}</p>"
            + (rows or "<p>No subscriptions.</p>")
            + "<h2>Payment method</h2>"
            + _card_line(state, customer)
            + f"<form method=post action='{escape(base)}/payment_method'>"
            "<label for=card>Card number</label>"
            "<input id=card name=card inputmode=numeric autocomplete=cc-number required"
            " value='4242 4242 4242 4242'>"
            "<button type=submit>Update card</button></form>"
            + "<h2>Invoice history</h2>"
            + _invoice_rows(state, customer["id"])
            + (f"<a class=cancel href='{escape(back)}'>Return to Lookout</a>" if back else "")
        )
        return _page("Billing portal", body)

    async def act(request: Request) -> Response:
        secret = request.path_params["secret"]
        session = find(secret)
        if session is None:
            return gone()
        sub = state.objects.get(request.path_params["sub_id"])
        if sub is None or sub["object"] != "subscription" or sub["customer"] != session["customer"]:
            return gone()
        if sub["status"] not in _SHOWN:
            return _page("Ended", "<h1>This subscription has ended.</h1>", 409)
        action = request.path_params["action"]
        if action not in ("cancel", "renew"):
            return gone()
        if action == "cancel":
            end = flows.resolve_cancel_at(state, sub, "min_period_end")
            flows.set_cancel_at(state, emit, sub, end)
        else:
            flows.set_cancel_at(state, emit, sub, None)
        return RedirectResponse(f"{state.public_url}/p/session/{secret}", 303)

    async def update_card(request: Request) -> Response:
        secret = request.path_params["secret"]
        session = find(secret)
        if session is None:
            return gone()
        form = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
        number = re.sub(r"[\s-]", "", form.get("card", ""))
        if not re.fullmatch(r"\d{13,19}", number):
            return _page("Card", "<h1>Enter a card number of 13 to 19 digits.</h1>", 400)
        if number == _DECLINED:
            return _page("Card declined", "<h1>Your card was declined.</h1>", 402)
        flows.update_default_payment_method(state, emit, session["customer"], last4=number[-4:])
        return RedirectResponse(f"{state.public_url}/p/session/{secret}", 303)

    async def hosted_invoice(request: Request) -> Response:
        inv = state.objects.get(request.path_params["invoice_id"])
        if inv is None or inv["object"] != "invoice" or inv["hosted_invoice_url"] is None:
            return _page("Not found", "<h1>This invoice link is not valid.</h1>", 404)
        line = inv["lines"]["data"][0] if inv["lines"]["data"] else None
        period = (
            f"<p class=muted>{_date(line['period']['start'])} to {_date(line['period']['end'])}</p>"
            if line
            else ""
        )
        body = (
            f"<span class=badge>TEST MODE</span><h1>Invoice {escape(inv['number'] or '')}</h1>"
            f"<div class=price>{_money(inv['total'], inv['currency'])}</div>{period}"
            f"<p>Status: <strong>{escape(inv['status'])}</strong></p>"
            f"<p class=muted>Billed to {escape(inv['customer_email'] or inv['customer'])}</p>"
        )
        return _page(f"Invoice {inv['number']}", body)

    return [
        Route("/p/session/{secret}", show, methods=["GET"]),
        Route(
            "/p/session/{secret}/subscriptions/{sub_id}/{action:str}",
            act,
            methods=["POST"],
        ),
        Route("/p/session/{secret}/payment_method", update_card, methods=["POST"]),
        Route("/i/{invoice_id}", hosted_invoice, methods=["GET"]),
    ]
