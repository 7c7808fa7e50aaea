"""The emulator's state kept in a file, so that a restarted `lookout demo` still knows the
customers, subscriptions and events that Lookout remembers (Stripe never forgets them either).

Generic on purpose: every field of `EmulatorState` is kept (the object tables, their order,
counters, whatever a new kind of object adds), except the ones named in `TRANSIENT`; the webhook
deliveries are kept too, and those unfinished are delivered again after a restart (at least
once, as Stripe delivers). New state needs no code here as long as it can be pickled.

The file is a pickle, written 0600 in the data dir: whoever can write there owns the demo
anyway. One that cannot be read (an older emulator's) is set aside and the emulator starts empty.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from app.demo.stripe_emulator.state import EmulatorState
from app.demo.stripe_emulator.webhooks import WebhookDispatcher

__all__ = ["TRANSIENT", "StateFile", "persist_after_changes"]

logger = logging.getLogger(__name__)

# Configuration given at start (it may differ on the next start) and what lives for one run
# only: the request log, injected faults, the clock.
TRANSIENT = frozenset({"api_version", "public_url", "api_key", "clock", "requests", "faults"})

_FORMAT = 1
_WAITING = frozenset({"pending", "delivering", "retrying"})


class StateFile:
    """Loads and saves one emulator's state (and its webhook deliveries) at `path`."""

    def __init__(self, path: Path, state: EmulatorState, webhooks: WebhookDispatcher) -> None:
        self.path = path
        self.state = state
        self.webhooks = webhooks
        self._restored_deliveries = False

    def save(self) -> None:
        kept = {
            f.name: getattr(self.state, f.name)
            for f in dataclasses.fields(self.state)
            if f.name not in TRANSIENT
        }
        data = pickle.dumps(
            {"format": _FORMAT, "state": kept, "deliveries": self.webhooks.deliveries},
            protocol=pickle.HIGHEST_PROTOCOL,
        )
        # A new file renamed over the old one: a crash mid-write leaves the old state whole.
        partial = self.path.with_name(self.path.name + ".partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(partial, self.path)

    def load(self) -> bool:
        """Restores the saved state, if any; answers whether there was one."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return False
        try:
            # Our own file, 0600 in the data dir (see the module docstring).
            saved = pickle.loads(raw)
            if saved.get("format") != _FORMAT:
                raise ValueError(f"format {saved.get('format')!r}")
            kept: dict[str, Any] = saved["state"]
            deliveries = saved["deliveries"]
        except (pickle.UnpicklingError, AttributeError, ImportError, EOFError, LookupError,
                TypeError, ValueError) as exc:  # fmt: skip
            aside = self.path.with_name(self.path.name + ".unreadable")
            os.replace(self.path, aside)
            logger.warning(
                "the Stripe emulator's saved state could not be read (%s); it starts empty"
                " (the old file is %s)",
                exc,
                aside,
            )
            return False
        names = {f.name for f in dataclasses.fields(self.state)} - TRANSIENT
        for name, value in kept.items():
            if name in names:  # a field since removed is dropped
                setattr(self.state, name, value)
        for delivery in deliveries.values():
            # Unfinished when the demo stopped: held until the server runs (see `resume`).
            if delivery.state in _WAITING:
                delivery.state = "held"
                self._restored_deliveries = True
        self.webhooks.deliveries = deliveries
        return True

    def resume_deliveries(self) -> None:
        """Delivers the events left unfinished by the last run; needs the running loop."""
        if self._restored_deliveries:
            self._restored_deliveries = False
            self.webhooks.release_held()


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_READS = frozenset({"GET", "HEAD", "OPTIONS"})


def persist_after_changes(app: ASGIApp, store: StateFile) -> ASGIApp:
    """Wraps the emulator's ASGI app: after every request that may change something (any
    method but GET, HEAD, OPTIONS, whichever route), the state is saved."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        store.resume_deliveries()
        try:
            await app(scope, receive, send)
        finally:
            if scope["method"] not in _READS:
                store.save()

    return wrapped
