"""The whole of Lookout on real sockets: the app, the Stripe emulator, and a signed-in user."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import anyio
import asyncpg
import httpx
from starlette.applications import Starlette

from app.application import create_app
from app.billing.provider import PaymentProvider
from app.demo.stripe_emulator import create_emulator
from app.settings import Settings
from app.users import create_api_key, create_user
from provisioning import (
    BackendNotConfigured,
    GraphBackend,
    PlacedGraphBackend,
    ProvisionerBackend,
    SharedRepositoryBackend,
)
from tests.support.live import free_port, live_server
from tests.support.webhook_order import webhook_order

__all__ = ["Stack", "drop_resources", "running_stack", "wait_for"]

T = TypeVar("T")


@dataclass
class Stack:
    url: str
    emulator_url: str
    settings: Settings
    app: Starlette
    user_id: str
    api_key: str
    http: httpx.AsyncClient  # signed in as the user
    emulator: httpx.AsyncClient  # the emulator's control endpoints
    anonymous: httpx.AsyncClient  # no API key: Stripe's view of Lookout

    async def new_user(self, email: str) -> tuple[str, str]:
        """Another customer: answers (user id, API key)."""
        async with self.app.state.services.pool.acquire() as conn:
            user = await create_user(conn, email)
            return user.id, await create_api_key(conn, user.id)

    async def subscription(self, subscription_id: str) -> dict[str, Any]:
        answer = await self.http.get(f"/v1/subscriptions/{subscription_id}")
        answer.raise_for_status()
        body: dict[str, Any] = answer.json()
        return body

    async def checkout(
        self, plan: str = "graph-standard", name: str = "my-graph"
    ) -> dict[str, Any]:
        answer = await self.http.post("/v1/checkout", json={"plan": plan, "resource_name": name})
        assert answer.status_code == 201, answer.text
        body: dict[str, Any] = answer.json()
        return body

    async def pay(self, session_id: str, *, deliver_webhooks: bool = True) -> dict[str, Any]:
        answer = await self.emulator.post(
            f"/_emulator/checkout/{session_id}/pay", json={"deliver_webhooks": deliver_webhooks}
        )
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    async def stripe_event(self, event_id: str) -> dict[str, Any]:
        """An event the emulator made, whole, as it would deliver it."""
        answer = await self.emulator.get(f"/_emulator/events/{event_id}")
        assert answer.status_code == 200, answer.text
        event: dict[str, Any] = answer.json()["event"]
        return event

    async def paid_events(self, session_id: str) -> dict[str, dict[str, Any]]:
        """Pays without delivering webhooks; answers the events by type, for the test to send."""
        paid = await self.pay(session_id, deliver_webhooks=False)
        return {e["type"]: await self.stripe_event(e["id"]) for e in paid["events"]}

    async def settled(self) -> None:
        """Every webhook the emulator made is delivered (late ones included: delivery is
        shuffled in the tests) and handled by Lookout's inbox."""
        drained = await self.emulator.post("/_emulator/webhooks/drain", json={"timeout": 20})
        assert drained.status_code == 200, drained.text
        pool = self.app.state.services.pool

        async def idle() -> bool:
            waiting: int = await pool.fetchval(
                "SELECT count(*) FROM webhook_events WHERE status <> 'processed'"
            )
            return waiting == 0

        await wait_for(idle, what="the inbox to be processed")

    async def wait_for_status(
        self, subscription_id: str, status: str, *, within: float = 30
    ) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            found = await self.subscription(subscription_id)
            return found if found["status"] == status else None

        return await wait_for(check, within=within, what=f"{subscription_id} to be {status}")

    async def wait_for_end_published(self, operation_id: str, *, within: float = 30) -> None:
        """Until the operation's terminal event is published: a provision's subscription turns
        active (the billing hooks) just before it is (`provisioning.execution` finalize)."""

        async def published() -> bool | None:
            async with self.app.state.services.pool.acquire() as conn:
                done: bool | None = await conn.fetchval(
                    "SELECT announced_at IS NOT NULL FROM operations WHERE id = $1", operation_id
                )
            return done or None

        await wait_for(published, within=within, what=f"{operation_id}'s end to be published")


async def wait_for(
    check: Callable[[], Awaitable[T | None]], *, within: float = 30, what: str = "a condition"
) -> T:
    """Polls `check` (an async callable answering a value or None) until it answers."""
    with anyio.move_on_after(within):
        while True:
            found = await check()
            if found:
                return found
            await anyio.sleep(0.05)
    raise AssertionError(f"timed out after {within} s waiting for {what}")


async def drop_resources(settings: Settings, app: Starlette) -> None:
    """Removes every graph and role the test's subscriptions and warm pool made, each on its
    server (while the app still serves: its runner's backends do it)."""
    assert settings.database_url is not None
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await conn.fetch("SELECT resource_id, resource_type FROM subscriptions")
        # The warm pool's databases are graphs' in all but name.
        rows += await conn.fetch(
            "SELECT id AS resource_id, 'graph' AS resource_type FROM warm_pool"
        )
    finally:
        await conn.close()
    runner = app.state.services.runner
    for row in rows:
        try:
            backend = runner.backend(row["resource_type"])
        except BackendNotConfigured:
            continue
        # Only the real ones: a test's fault-injecting wrapper may hold or fail.
        if isinstance(backend, GraphBackend | PlacedGraphBackend | SharedRepositoryBackend):
            with contextlib.suppress(Exception):
                await backend.teardown(row["resource_id"])


@contextlib.asynccontextmanager
async def running_stack(
    settings: Settings,
    *,
    provider: PaymentProvider | None = None,
    backends: Sequence[ProvisionerBackend] | None = None,
    webhook_retry_base: float = 0.2,
    extra_webhook_secrets: tuple[str, ...] = (),
    shuffle_webhooks: bool | None = None,
) -> AsyncIterator[Stack]:
    """The app and the emulator on real sockets. The emulator delivers webhooks late and out
    of order unless `shuffle_webhooks` is False (see `tests.support.webhook_order`)."""
    app_port, emulator_port = free_port(), free_port()
    app_url = f"http://127.0.0.1:{app_port}"
    emulator_url = f"http://127.0.0.1:{emulator_port}"
    secret = f"whsec_{secrets.token_hex(16)}"
    settings = replace(
        settings,
        public_url=app_url,
        stripe_api_base=emulator_url,
        stripe_webhook_secrets=(secret, *extra_webhook_secrets),
    )
    assert settings.database_url is not None
    emulator = create_emulator(
        webhook_url=f"{app_url}/v1/webhooks/stripe",
        webhook_secret=secret,
        public_url=emulator_url,
        api_key=settings.stripe_api_key,
        webhook_retry_base=webhook_retry_base,
        **webhook_order(shuffle_webhooks),
    )
    app = create_app(settings, provider=provider, backends=backends)
    async with (
        live_server(emulator, port=emulator_port),
        live_server(app, port=app_port, settings=settings),
    ):
        services = app.state.services
        async with services.pool.acquire() as conn:
            user = await create_user(conn, f"user-{secrets.token_hex(3)}@example.com")
            key = await create_api_key(conn, user.id)
        async with (
            httpx.AsyncClient(
                base_url=app_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
            ) as http,
            httpx.AsyncClient(base_url=emulator_url, timeout=30) as control,
            httpx.AsyncClient(base_url=app_url, timeout=30) as anonymous,
        ):
            try:
                yield Stack(
                    url=app_url,
                    emulator_url=emulator_url,
                    settings=settings,
                    app=app,
                    user_id=user.id,
                    api_key=key,
                    http=http,
                    emulator=control,
                    anonymous=anonymous,
                )
            finally:
                with anyio.CancelScope(shield=True):
                    await drop_resources(settings, app)
