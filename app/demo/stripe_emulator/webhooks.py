"""Events as Stripe builds them, signed as Stripe signs them, delivered in the background.

By default delivery is in creation order while the receiver answers 2xx. Stripe promises no
order: with a `shuffle_seed` every delivery waits a random delay (up to `max_delay`, drawn from
that seed) and they run concurrently, so events arrive late and out of order, and one seed
replays the same delays. A failed delivery is retried on Stripe's live-mode schedule (see
`retry_schedule`) while later events go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httpx
import stripe

from app.demo.stripe_emulator import objects
from app.demo.stripe_emulator.state import EmulatorState, Obj

logger = logging.getLogger(__name__)

_WAITING = frozenset({"pending", "delivering", "retrying"})
# Stripe retries a failed delivery "for up to three days with an exponential back off" in live
# mode. The emulator doubles from one minute within those three days (12 retries, the last
# about 34 hours after the one before); `retry_base` seconds of emulator time stand for a
# minute, so tests run the same schedule compressed.
_FIRST_RETRY = 60.0
_RETRY_HORIZON = 3 * 86400.0


def retry_schedule(first: float = _FIRST_RETRY, horizon: float = _RETRY_HORIZON) -> list[float]:
    """Stripe-time seconds before each retry: doubling from `first` while the total stays
    within `horizon`."""
    delays: list[float] = []
    delay, total = first, 0.0
    while total + delay <= horizon:
        delays.append(delay)
        total += delay
        delay *= 2
    return delays


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
        max_attempts: int | None = None,
        timeout: float = 10.0,
        shuffle_seed: int | None = None,
        max_delay: float = 0.0,
    ) -> None:
        self.state = state
        self.url = url
        self.secrets = [secret]
        self.retry_base = retry_base
        schedule = retry_schedule()
        if max_attempts is not None:
            schedule = schedule[: max(max_attempts - 1, 0)]
        self.schedule = schedule  # Stripe-time seconds before each retry
        self.max_attempts = len(schedule) + 1
        self.timeout = timeout
        self.shuffle_seed = shuffle_seed
        self.max_delay = max_delay
        self._rng = random.Random(shuffle_seed) if shuffle_seed is not None else None
        self._deliveries: set[asyncio.Task[None]] = set()
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
        tasks = [t for t in (self._worker, *self._retries, *self._deliveries) if t is not None]
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
                if self._rng is None:
                    await self._deliver(event_id, 0.0)
                    continue
                task = asyncio.get_running_loop().create_task(
                    self._deliver(event_id, self._rng.uniform(0.0, self.max_delay))
                )
                self._deliveries.add(task)
                task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, event_id: str, delay: float) -> None:
        """One attempt (after `delay`), then delivered, failed, or a retry on the schedule."""
        delivery = self.deliveries[event_id]
        if delay > 0:
            await asyncio.sleep(delay)
            if self.paused:  # paused while it waited: it goes with the others on resume
                delivery.state = "pending"
                self._ready.append(event_id)
                return
        try:
            ok, _status, _error = await self._attempt(event_id)
        except Exception:  # the worker must outlive one bad event
            logger.exception("delivering webhook %s failed", event_id)
            delivery.state = "failed"
            return
        retries = len(delivery.attempts) - 1
        if ok:
            delivery.state = "delivered"
        elif retries >= len(self.schedule):
            delivery.state = "failed"
            logger.warning("webhook %s failed %d times; giving up", event_id, self.max_attempts)
        else:
            delivery.state = "retrying"
            stripe_delay = self.schedule[retries]
            delivery.attempts[-1]["retry_in"] = stripe_delay
            wait = self.retry_base * stripe_delay / _FIRST_RETRY
            task = asyncio.get_running_loop().create_task(self._retry(event_id, wait))
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
