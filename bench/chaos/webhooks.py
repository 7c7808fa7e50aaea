"""Stripe's side of webhooks, on the soak's schedule: the emulator records every event and
delivers none (it has no webhook URL); this module fetches them, signs them as Stripe does and
POSTs them through the load balancer: some duplicated, some held back so that later events
overtake them, some delayed by seconds, and each retried on any non-2xx until it gets a 2xx."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from dataclasses import dataclass, field
from typing import Any

import httpx

from app.demo.stripe_emulator.webhooks import sign

__all__ = ["Delivery", "WebhookSender"]


@dataclass
class Delivery:
    event_id: str
    type: str
    attempts: list[int | str] = field(default_factory=list)  # status, or the error's name
    acknowledged: int = 0  # deliveries answered 2xx
    duplicated: bool = False
    reordered: bool = False
    delayed: bool = False

    @property
    def acked(self) -> bool:
        return self.acknowledged > 0


@dataclass
class WebhookSender:
    emulator_url: str
    target_url: str  # the load balancer's /v1/webhooks/stripe
    secret: str
    rng: random.Random
    deliveries: dict[str, Delivery] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def outstanding(self) -> int:
        return sum(1 for d in self.deliveries.values() if not d.acked)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        async with (
            httpx.AsyncClient(base_url=self.emulator_url, timeout=10) as control,
            httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as http,
        ):
            while not self._stop.is_set():
                try:
                    listed = (await control.get("/_emulator/events")).json()["data"]
                    for row in listed:
                        if row["id"] not in self.deliveries:
                            event = (await control.get(f"/_emulator/events/{row['id']}")).json()
                            self._schedule(http, event["event"])
                except (httpx.HTTPError, ValueError, KeyError):
                    pass  # asked again in a moment
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 0.3)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _schedule(self, http: httpx.AsyncClient, event: dict[str, Any]) -> None:
        delivery = Delivery(event["id"], event["type"])
        self.deliveries[delivery.event_id] = delivery
        roll = self.rng.random()
        delay = 0.0
        if roll < 0.05:
            delivery.reordered = True  # held back: events made after it arrive first
            delay = self.rng.uniform(2.0, 6.0)
        elif roll < 0.15:
            delivery.delayed = True
            delay = self.rng.uniform(0.3, 3.0)
        delivery.duplicated = self.rng.random() < 0.05
        duplicate_after = self.rng.uniform(0.0, 4.0)
        task = asyncio.ensure_future(self._deliver(http, event, delivery, delay, duplicate_after))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(
        self,
        http: httpx.AsyncClient,
        event: dict[str, Any],
        delivery: Delivery,
        delay: float,
        duplicate_after: float,
    ) -> None:
        await asyncio.sleep(delay)
        payload = json.dumps(event, indent=2)
        backoff = 0.5
        while not delivery.acked:
            if await self._attempt(http, payload, delivery):
                break
            await asyncio.sleep(backoff * self.rng.uniform(0.8, 1.2))
            backoff = min(backoff * 2, 8.0)  # Stripe's schedule, compressed from hours
        if delivery.duplicated:
            await asyncio.sleep(duplicate_after)
            await self._attempt(http, payload, delivery)

    async def _attempt(self, http: httpx.AsyncClient, payload: str, delivery: Delivery) -> bool:
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "Stripe-Signature": sign(payload, [self.secret]),  # signed afresh, as Stripe does
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
        }
        try:
            answer = await http.post(self.target_url, content=payload.encode(), headers=headers)
        except httpx.HTTPError as exc:
            delivery.attempts.append(type(exc).__name__)
            return False
        delivery.attempts.append(answer.status_code)
        if 200 <= answer.status_code < 300:
            delivery.acknowledged += 1
            return True
        return False
