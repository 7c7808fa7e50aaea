"""Builders of Stripe objects in the current API shape (as in Stripe's fixtures3.json).

Fields Lookout never sets are present with Stripe's neutral values, so that code written against
the emulator reads the same keys it will find in Stripe's answers.
"""

from __future__ import annotations

import calendar
import secrets
import string
from datetime import UTC, datetime
from typing import Any

_ALPHABET = string.ascii_letters + string.digits

Obj = dict[str, Any]


def stripe_id(prefix: str, length: int = 24) -> str:
    return prefix + "_" + "".join(secrets.choice(_ALPHABET) for _ in range(length))


def add_interval(ts: int, interval: str, count: int = 1) -> int:
    """The end of a billing period that starts at `ts` (calendar months, clamped day)."""
    start = datetime.fromtimestamp(ts, UTC)
    if interval == "day":
        return ts + 86400 * count
    if interval == "week":
        return ts + 7 * 86400 * count
    months = count * (12 if interval == "year" else 1)
    month_index = start.month - 1 + months
    year, month = start.year + month_index // 12, month_index % 12 + 1
    day = min(start.day, calendar.monthrange(year, month)[1])
    return int(start.replace(year=year, month=month, day=day).timestamp())


def empty_list(url: str, data: list[Obj] | None = None) -> Obj:
    return {"object": "list", "data": data or [], "has_more": False, "url": url}


def customer(cid: str, created: int, email: str | None, name: str | None, meta: Obj) -> Obj:
    return {
        "id": cid, "object": "customer", "address": None, "balance": 0, "created": created,
        "currency": None, "default_source": None, "delinquent": False, "description": None,
        "discount": None, "email": email, "invoice_prefix": secrets.token_hex(4).upper(),
        "invoice_settings": {
            "custom_fields": None, "default_payment_method": None, "footer": None,
            "rendering_options": None,
        },
        "livemode": False, "metadata": meta, "name": name, "next_invoice_sequence": 1,
        "phone": None, "preferred_locales": [], "shipping": None, "tax_exempt": "none",
        "test_clock": None,
    }  # fmt: skip


def product(
    pid: str, created: int, name: str, active: bool, description: str | None, meta: Obj
) -> Obj:
    return {
        "id": pid, "object": "product", "active": active, "created": created,
        "default_price": None, "description": description, "images": [], "livemode": False,
        "marketing_features": [], "metadata": meta, "name": name, "package_dimensions": None,
        "shippable": None, "statement_descriptor": None, "tax_code": None, "type": "service",
        "unit_label": None, "updated": created, "url": None,
    }  # fmt: skip


def price(
    pid: str, created: int, *, product_id: str, currency: str, unit_amount: int,
    recurring: Obj | None, lookup_key: str | None, nickname: str | None, meta: Obj, active: bool,
) -> Obj:  # fmt: skip
    return {
        "id": pid, "object": "price", "active": active, "billing_scheme": "per_unit",
        "created": created, "currency": currency, "custom_unit_amount": None, "livemode": False,
        "lookup_key": lookup_key, "metadata": meta, "nickname": nickname, "product": product_id,
        "recurring": recurring, "tax_behavior": "unspecified", "tiers_mode": None,
        "transform_quantity": None, "type": "recurring" if recurring else "one_time",
        "unit_amount": unit_amount, "unit_amount_decimal": str(unit_amount),
    }  # fmt: skip


def plan_of(p: Obj) -> Obj:
    """The legacy `plan` that subscription items still carry next to `price`."""
    recurring = p["recurring"] or {}
    return {
        "id": p["id"], "object": "plan", "active": p["active"], "amount": p["unit_amount"],
        "amount_decimal": p["unit_amount_decimal"], "billing_scheme": "per_unit",
        "created": p["created"], "currency": p["currency"],
        "interval": recurring.get("interval", "month"),
        "interval_count": recurring.get("interval_count", 1), "livemode": False,
        "metadata": p["metadata"], "meter": None, "nickname": p["nickname"],
        "product": p["product"], "tiers_mode": None, "transform_usage": None,
        "trial_period_days": None, "usage_type": "licensed",
    }  # fmt: skip


def checkout_session(
    sid: str, created: int, *, mode: str, url: str, success_url: str | None,
    cancel_url: str | None, customer_id: str | None, customer_email: str | None,
    client_reference_id: str | None, meta: Obj, currency: str | None, amount: int | None,
    expires_at: int,
) -> Obj:  # fmt: skip
    return {
        "id": sid, "object": "checkout.session", "adaptive_pricing": {"enabled": False},
        "after_expiration": None, "allow_promotion_codes": None, "amount_subtotal": amount,
        "amount_total": amount,
        "automatic_tax": {"enabled": False, "liability": None, "provider": None, "status": None},
        "billing_address_collection": None, "cancel_url": cancel_url,
        "client_reference_id": client_reference_id, "client_secret": None,
        "collected_information": None, "consent": None, "consent_collection": None,
        "created": created, "currency": currency, "currency_conversion": None,
        "custom_fields": [],
        "custom_text": {
            "after_submit": None, "shipping_address": None, "submit": None,
            "terms_of_service_acceptance": None,
        },
        "customer": customer_id, "customer_account": None,
        "customer_creation": None if mode == "subscription" else "if_required",
        "customer_details": None, "customer_email": customer_email, "discounts": [],
        "expires_at": expires_at, "integration_identifier": None, "invoice": None,
        "invoice_creation": None, "livemode": False, "locale": None,
        "managed_payments": {"enabled": False}, "metadata": meta,
        "mode": mode, "origin_context": None, "payment_intent": None, "payment_link": None,
        "payment_method_collection": "always", "payment_method_configuration_details": None,
        "payment_method_options": {"card": {"request_three_d_secure": "automatic"}},
        "payment_method_types": ["card"], "payment_status": "unpaid", "permissions": None,
        "phone_number_collection": {"enabled": False}, "recovered_from": None,
        "saved_payment_method_options": {
            "allow_redisplay_filters": ["always"], "payment_method_remove": "disabled",
            "payment_method_save": None,
        },
        "setup_intent": None, "shipping_address_collection": None, "shipping_cost": None,
        "shipping_options": [], "status": "open", "submit_type": None, "subscription": None,
        "success_url": success_url,
        "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
        "ui_mode": "hosted", "url": url, "wallet_options": None,
    }  # fmt: skip


def subscription_item(item_id: str, sub_id: str, created: int, p: Obj, start: int, end: int) -> Obj:
    return {
        "id": item_id, "object": "subscription_item", "billing_thresholds": None,
        "created": created, "current_period_end": end, "current_period_start": start,
        "discounts": [], "metadata": {}, "plan": plan_of(p), "price": dict(p), "quantity": 1,
        "subscription": sub_id, "tax_rates": [],
    }  # fmt: skip


def subscription(
    sub_id: str, created: int, *, customer_id: str, item: Obj, meta: Obj, status: str,
) -> Obj:  # fmt: skip
    return {
        "id": sub_id, "object": "subscription", "application": None,
        "application_fee_percent": None,
        "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
        "billing_cycle_anchor": created, "billing_cycle_anchor_config": None,
        "billing_mode": {"type": "flexible", "flexible": {"proration_discounts": "included"}},
        "billing_schedules": [], "billing_thresholds": None, "cancel_at": None,
        "cancel_at_period_end": False, "canceled_at": None,
        "cancellation_details": {"comment": None, "feedback": None, "reason": None},
        "collection_method": "charge_automatically", "created": created,
        "currency": item["price"]["currency"], "customer": customer_id,
        "customer_account": None, "days_until_due": None, "default_payment_method": None,
        "default_source": None, "default_tax_rates": [], "description": None, "discounts": [],
        "ended_at": None,
        "invoice_settings": {
            "account_tax_ids": None, "custom_fields": None, "description": None, "footer": None,
            "issuer": {"type": "self"},
        },
        "items": empty_list(f"/v1/subscription_items?subscription={sub_id}", [item]),
        "latest_invoice": None, "livemode": False, "managed_payments": {"enabled": False},
        "metadata": meta,
        "next_pending_invoice_item_invoice": None, "on_behalf_of": None,
        "pause_collection": None,
        "payment_settings": {
            "payment_method_options": None, "payment_method_types": None,
            "save_default_payment_method": "off",
        },
        "pending_invoice_item_interval": None, "pending_setup_intent": None,
        "pending_update": None, "schedule": None, "start_date": created, "status": status,
        "test_clock": None, "transfer_data": None, "trial_end": None,
        "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
        "trial_start": None,
    }  # fmt: skip


def invoice(
    inv_id: str, created: int, *, sub: Obj, customer: Obj, billing_reason: str, number: str,
) -> Obj:  # fmt: skip
    item = sub["items"]["data"][0]
    p, start, end = item["price"], item["current_period_start"], item["current_period_end"]
    amount = p["unit_amount"]
    line = {
        "id": stripe_id("il"), "object": "line_item", "amount": amount,
        "currency": p["currency"], "description": f"1 x {p['product']} (at {amount})",
        "discount_amounts": [], "discountable": True, "discounts": [], "invoice": inv_id,
        "livemode": False, "metadata": dict(sub["metadata"]),
        "parent": {
            "invoice_item_details": None,
            "subscription_item_details": {
                "invoice_item": None, "proration": False, "proration_details": None,
                "subscription": sub["id"], "subscription_item": item["id"],
            },
            "type": "subscription_item_details",
        },
        "period": {"end": end, "start": start}, "pretax_credit_amounts": [],
        "pricing": {
            "price_details": {"price": p["id"], "product": p["product"]},
            "type": "price_details", "unit_amount_decimal": str(amount),
        },
        "quantity": 1, "quantity_decimal": "1", "subscription": None, "subtotal": amount,
        "taxes": [],
    }  # fmt: skip
    return {
        "id": inv_id, "object": "invoice", "account_country": "US", "account_name": "Lookout",
        "account_tax_ids": None, "amount_due": amount, "amount_overpaid": 0,
        "amount_paid": 0, "amount_remaining": amount, "amount_shipping": 0,
        "application": None, "attempt_count": 0, "attempted": False, "auto_advance": True,
        "automatic_tax": {
            "disabled_reason": None, "enabled": False, "liability": None, "provider": None,
            "status": None,
        },
        "automatically_finalizes_at": None, "billing_reason": billing_reason,
        "collection_method": "charge_automatically", "created": created,
        "currency": p["currency"], "custom_fields": None, "customer": customer["id"],
        "customer_account": None, "customer_address": None, "customer_email": customer["email"],
        "customer_name": customer["name"], "customer_phone": None, "customer_shipping": None,
        "customer_tax_exempt": "none", "customer_tax_ids": [], "default_payment_method": None,
        "default_source": None, "default_tax_rates": [], "description": None, "discounts": [],
        "due_date": None, "effective_at": None, "ending_balance": None, "footer": None,
        "from_invoice": None, "hosted_invoice_url": None, "invoice_pdf": None,
        "issuer": {"type": "self"}, "last_finalization_error": None, "latest_revision": None,
        "lines": empty_list(f"/v1/invoices/{inv_id}/lines", [line]), "livemode": False,
        "metadata": {}, "next_payment_attempt": None, "number": number, "on_behalf_of": None,
        "parent": {
            "quote_details": None,
            "subscription_details": {"metadata": dict(sub["metadata"]), "subscription": sub["id"]},
            "type": "subscription_details",
        },
        "payment_settings": {
            "default_mandate": None, "payment_method_options": None,
            "payment_method_types": None,
        },
        "period_end": start, "period_start": start, "post_payment_credit_notes_amount": 0,
        "pre_payment_credit_notes_amount": 0, "receipt_number": None, "rendering": None,
        "shipping_cost": None, "shipping_details": None, "starting_balance": 0,
        "statement_descriptor": None, "status": "draft", "subscription": None,
        "status_transitions": {
            "finalized_at": None, "marked_uncollectible_at": None, "paid_at": None,
            "voided_at": None,
        },
        "subtotal": amount, "subtotal_excluding_tax": amount, "test_clock": None,
        "total": amount, "total_discount_amounts": [], "total_excluding_tax": amount,
        "total_pretax_credit_amounts": [], "total_taxes": [], "webhooks_delivered_at": None,
    }  # fmt: skip


def setup_intent(si_id: str, created: int, customer_id: str, payment_method: str) -> Obj:
    return {
        "id": si_id, "object": "setup_intent", "application": None,
        "automatic_payment_methods": None, "cancellation_reason": None,
        "client_secret": f"{si_id}_secret_{secrets.token_hex(8)}", "created": created,
        "customer": customer_id, "customer_account": None, "description": None,
        "excluded_payment_method_types": None, "flow_directions": None,
        "last_setup_error": None, "latest_attempt": None,
        "livemode": False, "mandate": None, "metadata": {}, "next_action": None,
        "on_behalf_of": None, "payment_method": payment_method,
        "payment_method_configuration_details": None,
        "payment_method_options": {"card": {"request_three_d_secure": "automatic"}},
        "payment_method_types": ["card"], "single_use_mandate": None, "status": "succeeded",
        "usage": "off_session",
    }  # fmt: skip


def event(
    eid: str, created: int, *, type: str, obj: Obj, previous: Obj | None, api_version: str,
    request_id: str | None, idempotency_key: str | None,
) -> Obj:  # fmt: skip
    data: Obj = {"object": obj}
    if previous is not None:
        data["previous_attributes"] = previous
    return {
        "id": eid, "object": "event", "api_version": api_version,
        "created": created, "data": data, "livemode": False, "pending_webhooks": 1,
        "request": {"id": request_id, "idempotency_key": idempotency_key}, "type": type,
    }  # fmt: skip


def billing_portal_session(
    bps_id: str, created: int, *, customer_id: str, return_url: str | None, url: str,
    locale: str | None, configuration: str,
) -> Obj:  # fmt: skip
    return {
        "id": bps_id, "object": "billing_portal.session", "configuration": configuration,
        "created": created, "customer": customer_id, "customer_account": None, "flow": None,
        "livemode": False, "locale": locale, "on_behalf_of": None, "return_url": return_url,
        "url": url,
    }  # fmt: skip


def payment_method(
    pm_id: str, created: int, *, customer_id: str, last4: str, email: str | None
) -> Obj:
    return {
        "id": pm_id, "object": "payment_method", "allow_redisplay": "always",
        "billing_details": {
            "address": None, "email": email, "name": None, "phone": None, "tax_id": None,
        },
        "card": {
            "brand": "visa", "checks": {
                "address_line1_check": None, "address_postal_code_check": None,
                "cvc_check": "pass",
            },
            "country": "US", "display_brand": "visa", "exp_month": 12, "exp_year": 2034,
            "fingerprint": secrets.token_hex(8), "funding": "credit", "generated_from": None,
            "last4": last4, "networks": {"available": ["visa"], "preferred": None},
            "regulated_status": "unregulated", "three_d_secure_usage": {"supported": True},
            "wallet": None,
        },
        "created": created, "customer": customer_id, "customer_account": None,
        "livemode": False, "metadata": {}, "type": "card",
    }  # fmt: skip


# -- payments and refunds ----------------------------------------------------------------------
# The money behind an invoice, in the current API's shape: the invoice no longer names its
# PaymentIntent or Charge; an `invoice_payment` links the two.


def payment_intent(
    pi_id: str, created: int, *, amount: int, currency: str, customer_id: str, description: str,
) -> Obj:  # fmt: skip
    return {
        "id": pi_id, "object": "payment_intent", "amount": amount, "amount_capturable": 0,
        "amount_details": {"tip": {}}, "amount_received": 0, "application": None,
        "application_fee_amount": None, "automatic_payment_methods": None,
        "canceled_at": None, "cancellation_reason": None, "capture_method": "automatic",
        "client_secret": f"{pi_id}_secret_{secrets.token_hex(12)}",
        "confirmation_method": "automatic", "created": created, "currency": currency,
        "customer": customer_id, "customer_account": None, "description": description,
        "excluded_payment_method_types": None, "last_payment_error": None,
        "latest_charge": None, "livemode": False, "managed_payments": {"enabled": False},
        "metadata": {}, "next_action": None,
        "on_behalf_of": None, "payment_method": None,
        "payment_method_configuration_details": None,
        "payment_method_options": {
            "card": {
                "installments": None, "mandate_options": None, "network": None,
                "request_three_d_secure": "automatic",
            },
        },
        "payment_method_types": ["card"], "processing": None, "receipt_email": None,
        "review": None, "setup_future_usage": "off_session", "shipping": None, "source": None,
        "statement_descriptor": None, "statement_descriptor_suffix": None,
        "status": "requires_payment_method", "transfer_data": None, "transfer_group": None,
    }  # fmt: skip


def charge(ch_id: str, created: int, *, pi: Obj, payment_method: str, email: str | None) -> Obj:
    """A card charge that succeeded for the whole of `pi`. Its `refunds` list is left out, as
    Stripe leaves it out unless expanded (since 2022-11-15)."""
    return {
        "id": ch_id, "object": "charge", "amount": pi["amount"],
        "amount_captured": pi["amount"], "amount_refunded": 0, "application": None,
        "application_fee": None, "application_fee_amount": None,
        "balance_transaction": stripe_id("txn"),
        "billing_details": {
            "address": {
                "city": None, "country": None, "line1": None, "line2": None,
                "postal_code": None, "state": None,
            },
            "email": email, "name": None, "phone": None, "tax_id": None,
        },
        "calculated_statement_descriptor": "LOOKOUT", "captured": True, "created": created,
        "currency": pi["currency"], "customer": pi["customer"],
        "description": pi["description"], "disputed": False,
        "failure_balance_transaction": None, "failure_code": None, "failure_message": None,
        "fraud_details": {}, "livemode": False, "metadata": {}, "on_behalf_of": None,
        "outcome": {
            "advice_code": None, "network_advice_code": None, "network_decline_code": None,
            "network_status": "approved_by_network", "reason": None, "risk_level": "normal",
            "risk_score": 32, "seller_message": "Payment complete.", "type": "authorized",
        },
        "paid": True, "payment_intent": pi["id"], "payment_method": payment_method,
        "payment_method_details": {
            "card": {
                "amount_authorized": pi["amount"], "brand": "visa",
                "checks": {
                    "address_line1_check": None, "address_postal_code_check": None,
                    "cvc_check": "pass",
                },
                "country": "US", "exp_month": 12, "exp_year": 2034,
                "fingerprint": secrets.token_hex(8), "funding": "credit", "last4": "4242",
                "mandate": None, "network": "visa", "network_token": {"used": False},
                "three_d_secure": None, "wallet": None, "authorization_code": None,
                "extended_authorization": {"status": "disabled"},
                "incremental_authorization": {"status": "unavailable"},
                "installments": None, "multicapture": {"status": "unavailable"},
                "network_transaction_id": None,
                "overcapture": {
                    "maximum_amount_capturable": pi["amount"], "status": "unavailable",
                },
                "regulated_status": "unregulated", "transaction_link_id": None,
            },
            "type": "card",
        },
        "receipt_email": None, "receipt_number": None,
        "receipt_url": f"https://pay.stripe.com/receipts/payment/{secrets.token_urlsafe(24)}",
        "refunded": False, "review": None, "shipping": None, "source": None,
        "source_transfer": None, "statement_descriptor": None,
        "statement_descriptor_suffix": None, "status": "succeeded", "transfer_data": None,
        "transfer_group": None,
    }  # fmt: skip


def invoice_payment(ip_id: str, created: int, *, inv: Obj, pi_id: str) -> Obj:
    """The default payment Stripe creates when it finalizes an invoice, still `open`."""
    return {
        "id": ip_id, "object": "invoice_payment", "amount_paid": None,
        "amount_requested": inv["amount_due"], "created": created, "currency": inv["currency"],
        "invoice": inv["id"], "is_default": True, "livemode": False,
        "payment": {"payment_intent": pi_id, "type": "payment_intent"}, "status": "open",
        "status_transitions": {"canceled_at": None, "paid_at": None},
    }  # fmt: skip


def refund(
    re_id: str, created: int, *, ch: Obj, amount: int, reason: str | None, meta: Obj,
) -> Obj:  # fmt: skip
    """A card refund: `succeeded` at once; its acquirer reference number comes later."""
    return {
        "id": re_id, "object": "refund", "amount": amount,
        "balance_transaction": stripe_id("txn"), "charge": ch["id"], "created": created,
        "currency": ch["currency"],
        "destination_details": {
            "card": {
                "reference": None, "reference_status": "pending",
                "reference_type": "acquirer_reference_number", "type": "refund",
            },
            "type": "card",
        },
        "metadata": meta, "payment_intent": ch["payment_intent"], "reason": reason,
        "receipt_number": None, "source_transfer_reversal": None, "status": "succeeded",
        "transfer_reversal": None, "customer": None, "customer_account": None,
        "payment_method": None,
    }  # fmt: skip
