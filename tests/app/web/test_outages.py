"""A request that meets a server Lookout needs while it is away is answered 503 with
Retry-After, never 500: the client (a browser, Stripe, a script) comes back, and nothing is
lost. Found by the chaos soak (a few 500s while PostgreSQL's backends were terminated)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from app.settings import Settings
from bench.chaos.proxy import fault_proxy, url_through
from tests.support.stack import running_stack, wait_for

pytestmark = pytest.mark.anyio


@pytest.mark.timeout(90)
async def test_requests_while_postgresql_is_unreachable_are_503_with_retry_after(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    assert settings.database_url is not None
    async with fault_proxy("postgres", settings.database_url) as proxy:
        through_proxy = replace(
            settings, database_url=url_through(settings.database_url, proxy.port)
        )
        async with running_stack(through_proxy) as stack:
            assert (await stack.http.get("/v1/subscriptions")).status_code == 200

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
