"""Customers: each buys graphs and repositories through Checkout, cancels, reactivates, runs
into plan limits, and watches its events and its operations' streams as a dashboard would."""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx

from app.users import create_api_key, create_user
from bench.chaos.sse import SseClient
from streams.topics import operation_topic, user_topic

__all__ = ["Customer", "Traffic"]

_PLANS = ("graph-standard", "graph-large", "graph-xlarge", "repository-reader", "repository-team")
_PLAN_LIMITS = {
    "graph-standard": 3,
    "graph-large": 3,
    "graph-xlarge": 1,
    "repository-reader": 5,
    "repository-team": 2,
}


@dataclass
class Customer:
    user_id: str
    api_key: str
    events: SseClient
    operations: list[SseClient] = field(default_factory=list)
    bought: dict[str, str] = field(default_factory=dict)  # subscription id -> plan


@dataclass
class Traffic:
    lb_url: str
    emulator_url: str
    database_url: str  # the chaos database, directly (not through the fault proxy)
    rng: random.Random
    customers: list[Customer] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    # Answers other than 503 in the 5xx range: under any fault a request is either served or
    # told to come back (503 with Retry-After), never answered with a server error.
    server_errors: list[str] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def stop(self) -> None:
        """No new actions; the stream clients go on until `stop_streams`."""
        self._stop.set()

    def stop_streams(self) -> None:
        for customer in self.customers:
            customer.events.stop()
            for op in customer.operations:
                op.stop()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_streams(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def add_customers(self, n: int) -> None:
        conn = await asyncpg.connect(self.database_url)
        try:
            for _ in range(n):
                user = await create_user(conn, f"chaos-{secrets.token_hex(4)}@example.com")
                key = await create_api_key(conn, user.id)
                events = SseClient(
                    self.lb_url, "/v1/events", key, user_topic(user.id),
                    random.Random(self.rng.random()),
                )  # fmt: skip
                self.customers.append(Customer(user.id, key, events))
        finally:
            await conn.close()

    async def run(self) -> None:
        for customer in self.customers:
            self._spawn(customer.events.run())
        await asyncio.gather(
            *(self._customer(c, random.Random(self.rng.random())) for c in self.customers)
        )

    async def _customer(self, customer: Customer, rng: random.Random) -> None:
        async with (
            httpx.AsyncClient(
                base_url=self.lb_url,
                headers={"Authorization": f"Bearer {customer.api_key}"},
                timeout=10,
            ) as http,
            httpx.AsyncClient(base_url=self.emulator_url, timeout=10) as emulator,
        ):
            await self._idle(rng.uniform(0.0, 2.0))
            while not self._stop.is_set():
                roll = rng.random()
                try:
                    if roll < 0.45 or not customer.bought:
                        await self._buy(customer, http, emulator, rng)
                    elif roll < 0.6:
                        await self._cancel_at_period_end(customer, http, rng)
                    elif roll < 0.72:
                        await self._reactivate(customer, http, rng)
                    elif roll < 0.82:
                        await self._cancel_now(customer, http, emulator, rng)
                    else:
                        await self._over_limit(customer, http, emulator, rng)
                except (
                    httpx.HTTPError,
                    OSError,
                    asyncpg.PostgresError,
                    asyncpg.InterfaceError,
                ) as exc:
                    # The soak terminates backends and cuts connections: a customer shrugs.
                    self.count(f"action failed: {type(exc).__name__}")
                await self._idle(rng.uniform(1.0, 4.0))

    async def _idle(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _call(
        self, http: httpx.AsyncClient, method: str, path: str, body: Any = None, tries: int = 5
    ) -> httpx.Response | None:
        """A client that retries what did not answer, or answered 5xx, a few times."""
        for attempt in range(tries):
            try:
                answer = await http.request(method, path, json=body)
                if answer.status_code < 500:
                    return answer
                self.count(f"{method} answered {answer.status_code}")
                if answer.status_code != 503:
                    self.server_errors.append(
                        f"{method} {path} answered {answer.status_code}: {answer.text[:160]}"
                    )
            except httpx.HTTPError as exc:
                self.count(f"{method} {type(exc).__name__}")
            await asyncio.sleep(0.5 * (attempt + 1))
        return None

    async def _subscriptions(self, http: httpx.AsyncClient) -> list[dict[str, Any]]:
        answer = await self._call(http, "GET", "/v1/subscriptions")
        if answer is None or answer.status_code != 200:
            return []
        data: list[dict[str, Any]] = answer.json()["data"]
        return data

    async def _buy(
        self,
        customer: Customer,
        http: httpx.AsyncClient,
        emulator: httpx.AsyncClient,
        rng: random.Random,
        plan: str | None = None,
    ) -> None:
        plan = plan or rng.choice(_PLANS)
        name = f"r{secrets.token_hex(3)}"
        answer = await self._call(
            http, "POST", "/v1/checkout", {"plan": plan, "resource_name": name}, tries=2
        )
        if answer is None:
            self.count("checkout unavailable")
            return
        if answer.status_code == 409:
            self.count("plan limit hit")
            return
        if answer.status_code != 201:
            self.count(f"checkout answered {answer.status_code}")
            return
        session = answer.json()
        paid = await emulator.post(
            f"/_emulator/checkout/{session['checkout_session_id']}/pay",
            json={"deliver_webhooks": False},
        )
        if paid.status_code != 200:
            self.count(f"pay answered {paid.status_code}")
            return
        self.count("checkouts paid")
        customer.bought[session["subscription_id"]] = plan
        self._spawn(self._follow(customer, http, session["checkout_session_id"], rng))

    async def _follow(
        self, customer: Customer, http: httpx.AsyncClient, session_id: str, rng: random.Random
    ) -> None:
        """A browser on the Checkout return page: polls until there is an operation, then
        follows its stream (possibly late, as a late joiner)."""
        while not self._stop.is_set():
            answer = await self._call(http, "GET", f"/v1/checkout/{session_id}", tries=1)
            if answer is not None and answer.status_code == 200:
                op_id = answer.json().get("operation_id")
                if op_id:
                    await self._idle(rng.choice((0.0, 0.0, rng.uniform(1.0, 10.0))))
                    if self._stop.is_set():
                        # Too late to join: a client made now, after the settle counted the
                        # streams still open, would be stopped before its 204.
                        return
                    self._watch_operation(customer, op_id, rng)
                    return
            await self._idle(1.0)

    def _watch_operation(self, customer: Customer, op_id: str, rng: random.Random) -> None:
        client = SseClient(
            self.lb_url,
            f"/v1/operations/{op_id}/events",
            customer.api_key,
            operation_topic(op_id),
            random.Random(rng.random()),
            mean_drop_seconds=3.0,
        )
        customer.operations.append(client)
        self._spawn(client.run())

    async def _pick(
        self, http: httpx.AsyncClient, rng: random.Random, status: str, cancelling: bool
    ) -> dict[str, Any] | None:
        mine = [
            s
            for s in await self._subscriptions(http)
            if s["status"] == status and bool(s.get("cancel_at_period_end")) == cancelling
        ]
        return rng.choice(mine) if mine else None

    async def _cancel_at_period_end(
        self, customer: Customer, http: httpx.AsyncClient, rng: random.Random
    ) -> None:
        sub = await self._pick(http, rng, "active", False)
        if sub is not None:
            answer = await self._call(http, "POST", f"/v1/subscriptions/{sub['id']}/cancel")
            self.count(f"cancel at period end: {answer.status_code if answer else 'no answer'}")

    async def _reactivate(
        self, customer: Customer, http: httpx.AsyncClient, rng: random.Random
    ) -> None:
        sub = await self._pick(http, rng, "active", True)
        if sub is not None:
            answer = await self._call(http, "POST", f"/v1/subscriptions/{sub['id']}/reactivate")
            self.count(f"reactivate: {answer.status_code if answer else 'no answer'}")

    async def _cancel_now(
        self,
        customer: Customer,
        http: httpx.AsyncClient,
        emulator: httpx.AsyncClient,
        rng: random.Random,
    ) -> None:
        """The customer cancels in Stripe's portal, at once: Lookout hears it by webhook."""
        sub = await self._pick(http, rng, "active", rng.random() < 0.3)
        if sub is None:
            return
        stripe_id = await self._stripe_subscription(sub["id"])
        if stripe_id is None:
            return
        done = await emulator.post(
            f"/_emulator/subscriptions/{stripe_id}/portal_cancel",
            json={"at_period_end": False, "deliver_webhooks": False},
        )
        self.count(f"cancelled in the portal: {done.status_code}")

    async def _stripe_subscription(self, subscription_id: str) -> str | None:
        # The API does not show Stripe's id; the customer's portal link would know it.
        conn = await asyncpg.connect(self.database_url)
        try:
            found: str | None = await conn.fetchval(
                "SELECT stripe_subscription_id FROM subscriptions WHERE id = $1", subscription_id
            )
        finally:
            await conn.close()
        return found

    async def _over_limit(
        self,
        customer: Customer,
        http: httpx.AsyncClient,
        emulator: httpx.AsyncClient,
        rng: random.Random,
    ) -> None:
        """Buys the plan the customer holds most of, until its limit answers 409."""
        held: dict[str, int] = {}
        for s in await self._subscriptions(http):
            if s["status"] in ("pending_payment", "provisioning", "active", "past_due"):
                held[s["plan"]] = held.get(s["plan"], 0) + 1
        if not held:
            return
        plan = max(held, key=lambda p: held[p] / _PLAN_LIMITS.get(p, 1))
        await self._buy(customer, http, emulator, rng, plan=plan)
