"""A local stand-in for the part of Stripe's API that Lookout uses (see `create_emulator`)."""

from __future__ import annotations

from app.demo.stripe_emulator.app import API_VERSION, Emulator, create_emulator
from app.demo.stripe_emulator.webhooks import sign

__all__ = ["API_VERSION", "Emulator", "create_emulator", "sign"]
