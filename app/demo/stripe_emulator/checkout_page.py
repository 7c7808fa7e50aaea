"""The hosted checkout page: what a customer sees at a Checkout Session's `url`."""

from __future__ import annotations

import base64
import hashlib
from html import escape
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from app.demo.stripe_emulator import flows
from app.demo.stripe_emulator.errors import StripeError
from app.demo.stripe_emulator.state import EmulatorState, Obj
from app.demo.stripe_emulator.webhooks import WebhookDispatcher

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;background:#f6f8fa;margin:0;
color:#1a1f36}main{max-width:420px;margin:8vh auto;background:#fff;border-radius:10px;
box-shadow:0 2px 12px rgba(0,0,0,.08);padding:32px}h1{font-size:1.2rem;margin:0 0 4px}
.price{font-size:2rem;font-weight:600;margin:12px 0 24px}.muted{color:#697386;font-size:.9rem}
label{display:block;font-size:.9rem;margin-bottom:6px}input{width:100%;box-sizing:border-box;
padding:10px;border:1px solid #d0d7de;border-radius:6px;font-size:1rem;margin-bottom:16px}
button{width:100%;padding:12px;border:0;border-radius:6px;background:#635bff;color:#fff;
font-size:1rem;font-weight:600;cursor:pointer}a{color:#635bff}.cancel{display:block;
text-align:center;margin-top:16px}.badge{display:inline-block;background:#ffde92;color:#3d2c00;
border-radius:4px;padding:2px 6px;font-size:.75rem;font-weight:600}
"""


# The page's one inline style, allowed by its hash; no script at all. No form-action: the pay
# form's answer redirects to the merchant's success URL, on another origin. Lookout keeps a
# policy a route sets itself (app.web.headers), so this holds where the demo mounts the emulator.
_POLICY = (
    "default-src 'none'; "
    f"style-src 'sha256-{base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()}'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": _POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    html = (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>"
        "<meta name=viewport content='width=device-width,initial-scale=1'>"
        f"<style>{_STYLE}</style></head><body><main>{body}</main></body></html>"
    )
    return HTMLResponse(html, status, headers=_HEADERS)


def _money(amount: int, currency: str) -> str:
    return f"{amount / 100:,.2f} {currency.upper()}"


def _success_redirect(session: Obj) -> Response:
    url = session["success_url"]
    if not url:
        return _page("Payment complete", "<h1>Thanks, your payment is complete.</h1>")
    return RedirectResponse(url.replace("{CHECKOUT_SESSION_ID}", session["id"]), 303)


def checkout_routes(state: EmulatorState, webhooks: WebhookDispatcher) -> list[Route]:
    def find(session_id: str) -> Obj | None:
        obj = state.objects.get(session_id)
        return obj if obj is not None and obj["object"] == "checkout.session" else None

    async def show(request: Request) -> Response:
        session = find(request.path_params["session_id"])
        if session is None:
            return _page("Not found", "<h1>This checkout link is not valid.</h1>", 404)
        if session["status"] == "complete":
            return _success_redirect(session)
        if session["status"] == "expired":
            return _page("Expired", "<h1>This checkout session has expired.</h1>", 410)
        price_id, quantity = state.session_items[session["id"]][0]
        price = state.get("price", price_id)
        product = state.get("product", price["product"])
        interval = (price["recurring"] or {}).get("interval", "month")
        email = session["customer_email"] or ""
        if session["customer"]:
            email = state.get("customer", session["customer"])["email"] or ""
        cancel = session["cancel_url"]
        # Absolute, so that the page also works where the emulator is mounted under a path.
        pay_url = f"{state.public_url}/checkout/{session['id']}/pay"
        cancel_link = f"<a class=cancel href='{escape(cancel)}'>Cancel</a>" if cancel else ""
        body = (
            "<span class=badge>TEST MODE</span>"
            f"<h1>Subscribe to {escape(product['name'])}</h1>"
            f"<div class=price>{_money(price['unit_amount'] * quantity, price['currency'])}"
            f" <span class=muted>per {escape(interval)}</span></div>"
            f"<form method=post action='{escape(pay_url)}'>"
            "<label for=email>Email</label>"
            f"<input id=email name=email type=email required value='{escape(email)}'>"
            "<label for=card>Card</label>"
            "<input id=card name=card value='4242 4242 4242 4242' readonly>"
            "<button type=submit>Pay</button></form>"
            f"{cancel_link}"
            "<p class=muted>Local Stripe emulator: no money moves.</p>"
        )
        return _page(f"Pay {product['name']}", body)

    async def pay(request: Request) -> Response:
        session = find(request.path_params["session_id"])
        if session is None:
            return _page("Not found", "<h1>This checkout link is not valid.</h1>", 404)
        form = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
        email = form.get("email")
        try:
            flows.complete_checkout(
                state,
                lambda t, o, p=None: webhooks.emit(t, o, previous=p),
                session["id"],
                email=email or None,
                async_payment=False,
            )
        except StripeError as exc:
            return _page("Cannot pay", f"<h1>{escape(exc.message)}</h1>", 409)
        return _success_redirect(session)

    return [
        Route("/checkout/{session_id}", show, methods=["GET"]),
        Route("/checkout/{session_id}/pay", pay, methods=["POST"]),
    ]
