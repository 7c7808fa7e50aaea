"""What `POST /v1/webhooks/stripe` checks before it stores an event in the inbox and
acknowledges it (app.web.routes.billing). Nothing more on the request path, so that the answer
comes in milliseconds and a crash after it loses nothing."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import stripe

from app.billing.errors import InvalidSignature, MissingSignature, NotAStripeEvent
from app.db import Connection

__all__ = [
    "SIGNATURE_TOLERANCE_SECONDS",
    "VerifiedEvent",
    "check_signature_header",
    "parse_event",
    "store_events",
    "verify_signature",
]

logger = logging.getLogger(__name__)

SIGNATURE_TOLERANCE_SECONDS = 300


@dataclass(frozen=True, slots=True)
class VerifiedEvent:
    id: str
    type: str
    created: datetime
    payload: dict[str, Any]
    text: str  # as Stripe signed it: stored as is, not encoded again
    # When it was verified: the inbox row's received_at, however long it waits to be written.
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))


def check_signature_header(header: str | None, *, now: float | None = None) -> None:
    """What can be refused without the body or an HMAC: no header, one that is not Stripe's
    form (`t=<seconds>,v1=<signature>`), or one older than the tolerance (the SDK checks the
    age only after computing the HMAC)."""
    if not header:
        raise MissingSignature("The Stripe-Signature header is missing.")
    if not header.isascii():
        raise InvalidSignature("The Stripe-Signature header is not ASCII.")
    timestamp: int | None = None
    signed = False
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == "v1" and value:
            signed = True
    if timestamp is None or not signed:
        raise InvalidSignature(
            "The Stripe-Signature header needs a timestamp (t=) and a v1 signature.",
        )
    if timestamp < (time.time() if now is None else now) - SIGNATURE_TOLERANCE_SECONDS:
        raise InvalidSignature(
            f"This Stripe-Signature is older than {SIGNATURE_TOLERANCE_SECONDS} s.",
        )


def verify_signature(body: bytes, header: str | None, secrets: tuple[str, ...]) -> str:
    """Answers the body as text once one of the secrets (rotation) verifies its signature."""
    if not header:
        raise MissingSignature("The Stripe-Signature header is missing.")
    if not header.isascii():
        # Stripe's header is ASCII; the SDK's `hmac.compare_digest` raises TypeError on
        # anything else (any byte over 0x7f reaches us as a latin-1 character).
        raise InvalidSignature("The Stripe-Signature header is not ASCII.")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise NotAStripeEvent("The webhook body is not UTF-8 text.") from None
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(
                text, header, secret, tolerance=SIGNATURE_TOLERANCE_SECONDS
            )
        except stripe.SignatureVerificationError:
            continue
        return text
    raise InvalidSignature(
        "No configured webhook secret verifies this Stripe-Signature, or it is older than"
        f" {SIGNATURE_TOLERANCE_SECONDS} s; check STRIPE_WEBHOOK_SECRET.",
    )


def parse_event(text: str) -> VerifiedEvent:
    """A verified body must still be a Stripe event: an object with id, type, created, data."""
    try:
        payload = json.loads(text)
    except ValueError:
        raise NotAStripeEvent("The webhook body is not JSON.") from None
    except RecursionError:
        # Signed, yet thousands of levels deep: no Stripe event is.
        raise NotAStripeEvent("The webhook body is nested too deeply.") from None
    if not isinstance(payload, dict) or payload.get("object") != "event":
        raise NotAStripeEvent("The webhook body is not a Stripe event object.")
    event_id, event_type, created = payload.get("id"), payload.get("type"), payload.get("created")
    data = payload.get("data")
    if not isinstance(event_id, str) or not event_id.startswith("evt_") or len(event_id) > 255:
        raise NotAStripeEvent("The event has no valid 'id' (evt_…).")
    if not isinstance(event_type, str) or not event_type or len(event_type) > 255:
        raise NotAStripeEvent("The event has no valid 'type'.")
    if not isinstance(created, int) or isinstance(created, bool) or created < 0:
        raise NotAStripeEvent("The event has no valid 'created' timestamp.")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        raise NotAStripeEvent("The event has no 'data.object'.")
    try:
        moment = datetime.fromtimestamp(created, UTC)
    except (OverflowError, ValueError, OSError):
        raise NotAStripeEvent("The event's 'created' is out of range.") from None
    return VerifiedEvent(id=event_id, type=event_type, created=moment, payload=payload, text=text)


async def store_events(conn: Connection, events: Sequence[VerifiedEvent]) -> set[str]:
    """Stores events of distinct ids in one statement; answers the ids that were new. With no
    events the statement runs all the same (it warms a connection up).

    Rows are inserted in id order: two instances storing the same redeliveries in different
    arrival orders would otherwise each wait on an id the other inserted first (a deadlock).
    unnest yields the arrays in order, and the INSERT takes its rows in that order."""
    events = sorted(events, key=lambda e: e.id)
    rows = await conn.fetch(
        "INSERT INTO webhook_events (id, type, stripe_created, payload, received_at)"
        " SELECT id, type, created, payload::jsonb, received"
        " FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::timestamptz[])"
        " AS e(id, type, created, payload, received)"
        " ON CONFLICT (id) DO NOTHING RETURNING id",
        [e.id for e in events],
        [e.type for e in events],
        [e.created for e in events],
        [e.text for e in events],
        [e.received_at for e in events],
    )
    return {row["id"] for row in rows}
