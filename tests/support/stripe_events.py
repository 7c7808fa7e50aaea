"""Stripe webhook payloads built from Stripe's own example objects, signed as Stripe signs."""

from __future__ import annotations

import copy
import json
import secrets
import time
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import stripe

__all__ = ["deliver", "emulator_events", "make_event", "signature", "stripe_object"]

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "stripe_objects.json"


@cache
def _resources() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(FIXTURES.read_text())["resources"]
    return loaded


def stripe_object(kind: str, **overrides: Any) -> dict[str, Any]:
    """Stripe's example `kind` object (e.g. "subscription") with `overrides` set on top."""
    obj: dict[str, Any] = copy.deepcopy(_resources()[kind])
    obj.update(overrides)
    return obj


def make_event(
    event_type: str,
    obj: dict[str, Any],
    *,
    created: int | None = None,
    event_id: str | None = None,
) -> dict[str, Any]:
    event = stripe_object("event")
    event.update(
        id=event_id or f"evt_test_{secrets.token_hex(8)}",
        type=event_type,
        created=created if created is not None else int(time.time()),
        data={"object": obj},
    )
    return event


def signature(payload: str, secret: str, *, timestamp: int | None = None) -> str:
    header: str = stripe.WebhookSignature.generate_signature_header(
        payload, secret, timestamp=timestamp
    )
    return header


async def deliver(
    http: httpx.AsyncClient,
    payload: dict[str, Any] | str | bytes,
    secret: str,
    *,
    timestamp: int | None = None,
) -> httpx.Response:
    """POSTs to the webhook endpoint as Stripe does."""
    if isinstance(payload, dict):
        payload = json.dumps(payload)
    text = payload.decode() if isinstance(payload, bytes) else payload
    return await http.post(
        "/v1/webhooks/stripe",
        content=text.encode(),
        headers={
            "Stripe-Signature": signature(text, secret, timestamp=timestamp),
            "Content-Type": "application/json",
        },
    )


async def emulator_events(control: httpx.AsyncClient) -> list[dict[str, Any]]:
    """Every event the emulator made, whole, oldest first."""
    summary = (await control.get("/_emulator/events")).json()["data"]
    whole = []
    for item in summary:
        answer = await control.get(f"/_emulator/events/{item['id']}")
        whole.append(answer.json()["event"])
    return whole
