"""A request that meets a server Lookout needs while it is away is answered 503 with
Retry-After, never 500: the client (a browser, Stripe, a script) comes back, and nothing is
lost. Found by the chaos soak (a few 500s while PostgreSQL's backends were terminated)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace

import anyio
import httpx
import pytest

from app.settings import Settings
from bench.chaos.proxy import FaultProxy, fault_proxy, url_through
from tests.support.stack import Stack, running_stack, wait_for

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def stack_behind_postgres_proxy(
    settings: Settings,
) -> AsyncIterator[tuple[Stack, FaultProxy]]:
    """A running stack whose every PostgreSQL connection goes through a fault proxy, once it
    has answered a first request."""
    assert settings.database_url is not None
    async with fault_proxy("postgres", settings.database_url) as proxy:
        through_proxy = replace(
            settings, database_url=url_through(settings.database_url, proxy.port)
        )
        async with running_stack(through_proxy) as stack:
            assert (await stack.http.get("/v1/subscriptions")).status_code == 200
            yield stack, proxy


@pytest.mark.timeout(90)
async def test_requests_while_postgresql_is_unreachable_are_503_with_retry_after(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    async with stack_behind_postgres_proxy(settings) as (stack, proxy):
        await proxy.refuse()  # every connection cut, new ones refused
        answers = [
            await stack.http.get("/v1/subscriptions"),
            await stack.http.get("/v1/operations/op_0123456789abcdef01234567"),
            await stack.http.post(
                "/v1/checkout", json={"plan": "graph-standard", "resource_name": "outage"}
            ),
        ]
        for answer in answers:
            assert answer.status_code == 503, (answer.request.url, answer.text)
            assert answer.headers["Retry-After"] == "2"
            assert answer.json()["error"]["code"] == "unavailable"
        assert not [r for r in caplog.records if r.exc_info and r.name.startswith("app.web")]

        await proxy.accept()

        async def served() -> dict[str, object] | None:
            answer = await stack.http.get("/v1/subscriptions")
            return answer.json() if answer.status_code == 200 else None

        # Served again, and nothing half-made by the refused checkout.
        assert await wait_for(served, what="PostgreSQL to be back") == {"data": []}


@pytest.mark.timeout(90)
async def test_a_pooled_connection_told_its_backend_was_terminated_is_503_not_500(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A terminated backend sends FATAL, then closes. asyncpg reads the FATAL on an idle pooled
    connection as a protocol error and waits for a sync that never comes; until the close
    arrives, the pool still hands that connection out, and its first statement raises
    `InternalClientError` ("cannot switch to state 15; another operation (2) is in
    progress"). Found by the chaos soak: four 500s while backends were terminated."""
    async with stack_behind_postgres_proxy(settings) as (stack, proxy):
        assert proxy.send_fatal() > 0
        await anyio.sleep(0.05)  # read by every idle connection; the closes come later
        answers: list[httpx.Response] = []

        async def ask() -> None:
            answers.append(await stack.http.get("/v1/subscriptions"))

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(ask)
        statuses = sorted(answer.status_code for answer in answers)
        # The background loops meet some of those connections first.
        assert 503 in statuses and set(statuses) <= {200, 503}, statuses
        for answer in answers:
            if answer.status_code == 503:
                assert answer.headers["Retry-After"] == "2"
        assert not [r for r in caplog.records if r.exc_info and r.name.startswith("app.web")]

        proxy.drop_all()  # the closes arrive

        async def served() -> int | None:
            answer = await stack.http.get("/v1/subscriptions")
            return answer.status_code if answer.status_code == 200 else None

        assert await wait_for(served, what="fresh connections") == 200
        health = await stack.http.get("/healthz")
        assert health.status_code == 200, health.text
