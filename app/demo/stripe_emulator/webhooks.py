"""Events as Stripe builds them, signed as Stripe signs them, delivered in the background.

Delivery is in creation order while the receiver answers 2xx; a failed delivery is retried with
exponential backoff while later events go on, so the receiver sees the reordering Stripe causes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httpx
import stripe

from app.demo.stripe_emulator import objects
from app.demo.stripe_emulator.state import EmulatorState, Obj

logger = logging.getLogger(__name__)

_WAITING = frozenset({"pending", "delivering", "retrying"})


@dataclass
class Delivery:
    event_id: str
    state: str  # pending | held | delivering | retrying | delivered | failed
    attempts: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self, event: Obj) -> Obj:
        return {
            "id": self.event_id,
            "type": event["type"],
            "created": event["created"],
            "delivery": self.state,
            "attempts": self.attempts,
        }


def sign(payload: str, secrets: list[str], timestamp: int | None = None) -> str:
    """`Stripe-Signature`: one `v1` per secret that is valid, as during a secret's rotation."""
    header: str = stripe.WebhookSignature.generate_signature_header(
        payload, secrets[0], timestamp=timestamp
    )
    t = header.split(",", 1)[0].removeprefix("t=")
    for extra in secrets[1:]:
        mac = hmac.new(extra.encode(), f"{t}.{payload}".encode(), hashlib.sha256)
        header += f",v1={mac.hexdigest()}"
    return header


class WebhookDispatcher:
    def __init__(
        self,
        state: EmulatorState,
        *,
        url: str | None,
        secret: str,
        retry_base: float = 1.0,
        max_attempts: int = 8,
        timeout: float = 10.0,
    ) -> None:
        self.state = state
        self.url = url
        self.secrets = [secret]
        self.retry_base = retry_base
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.paused = False
        self.deliveries: dict[str, Delivery] = {}
        self._ready: deque[str] = deque()
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._retries: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None

    # -- creating events -------------------------------------------------------------------
    def emit(
        self,
        event_type: str,
        obj: Obj,
        *,
        previous: Obj | None = None,
        request_id: str | None = None,
        idempotency_key: str | None = None,
        deliver: bool = True,
    ) -> Obj:
        """Record an event with a snapshot of `obj` and queue it (or hold it) for delivery."""
        evt = objects.event(
            objects.stripe_id("evt"),
            self.state.now(),
            type=event_type,
            obj=self.state.snapshot(obj),
            previous=previous,
            api_version=self.state.api_version,
            request_id=request_id,
            idempotency_key=idempotency_key,
        )
        self.state.put(evt)
        delivery = Delivery(evt["id"], "pending" if deliver and self.url else "held")
        self.deliveries[evt["id"]] = delivery
        if delivery.state == "pending":
            self._queue(evt["id"])
        return evt

    def release_held(self) -> int:
        held = [d for d in self.deliveries.values() if d.state == "held"]
        for d in held:
            d.state = "pending"
            self._queue(d.event_id)
        return len(held)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._wake.set()

    def summary(self) -> list[Obj]:
        return [d.as_json(self.state.objects[d.event_id]) for d in self.deliveries.values()]

    # -- delivering --------------------------------------------------------------------------
    async def deliver_now(self, event_id: str) -> Obj:
        """One extra attempt right now, whatever the queue does (a resend, or a duplicate)."""
        ok, status, error = await self._attempt(event_id)
        delivery = self.deliveries[event_id]
        if ok:
            delivery.state = "delivered"
        return {"id": event_id, "status": status, "error": error, "delivered": ok}

    async def drain(self, wait_seconds: float) -> bool:
        """Wait until nothing is queued, in flight or waiting for a retry (held events aside)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        while any(d.state in _WAITING for d in self.deliveries.values()):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def aclose(self) -> None:
        tasks = [t for t in (self._worker, *self._retries) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._worker = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _queue(self, event_id: str) -> None:
        self._ready.append(event_id)
        self._wake.set()
        if self._worker is None or self._worker.done():
            with contextlib.suppress(RuntimeError):  # no running loop: started on next emit
                self._worker = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._ready and not self.paused:
                event_id = self._ready.popleft()
                delivery = self.deliveries[event_id]
                if delivery.state != "pending":
                    continue
                delivery.state = "delivering"
                try:
                    ok, _status, _error = await self._attempt(event_id)
                except Exception:  # the worker must outlive one bad event
                    logger.exception("delivering webhook %s failed", event_id)
                    delivery.state = "failed"
                    continue
                if ok:
                    delivery.state = "delivered"
                elif len(delivery.attempts) >= self.max_attempts:
                    delivery.state = "failed"
                    logger.warning(
                        "webhook %s failed %d times; giving up", event_id, self.max_attempts
                    )
                else:
                    delivery.state = "retrying"
                    delay = self.retry_base * 2 ** (len(delivery.attempts) - 1)
                    task = asyncio.get_running_loop().create_task(self._retry(event_id, delay))
                    self._retries.add(task)
                    task.add_done_callback(self._retries.discard)

    async def _retry(self, event_id: str, delay: float) -> None:
        await asyncio.sleep(delay)
        delivery = self.deliveries[event_id]
        if delivery.state == "retrying":
            delivery.state = "pending"
            self._queue(event_id)

    async def _attempt(self, event_id: str) -> tuple[bool, int | None, str | None]:
        event = self.state.objects[event_id]
        delivery = self.deliveries[event_id]
        url = self.url
        status: int | None = None
        error: str | None = None
        if url is None:
            error = "no webhook endpoint is configured"
        else:
            payload = json.dumps(event, indent=2)
            headers = {
                "Content-Type": "application/json; charset=utf-8",
                "Stripe-Signature": sign(payload, self.secrets),
                "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
                "Accept": "*/*; q=0.5, application/xml",
                "Cache-Control": "no-cache",
            }
            if self._client is None:
                self._client = httpx.AsyncClient(timeout=self.timeout)
            try:
                response = await self._client.post(url, content=payload.encode(), headers=headers)
                status = response.status_code
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
        ok = status is not None and 200 <= status < 300
        delivery.attempts.append({"at": self.state.clock(), "status": status, "error": error})
        if ok:
            event["pending_webhooks"] = 0
        else:
            logger.info("webhook %s to %s failed: %s", event_id, url, error or status)
        return ok, status, error
