"""The browser's own EventSource against an operation stream (issue 3): it receives the events,
reconnects with Last-Event-ID after its connection is cut, resumes with no gap and no
duplicate, and stops for good after the 204 that follows the terminal event."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from redis.exceptions import RedisError

from app.settings import Settings
from provisioning import GraphBackend, SharedRepositoryBackend
from streams import Event, StreamOptions, user_topic
from tests.browser.proxy import dropping_proxy
from tests.browser.support import GatedBackend, operation_id_of, server_events
from tests.support.redis_server import redis_process
from tests.support.stack import running_stack

if TYPE_CHECKING:
    from playwright.async_api import Page, Request

pytestmark = [pytest.mark.anyio, pytest.mark.browser, pytest.mark.timeout(120)]

# A bare EventSource with no handling of its own: what the browser does by itself.
OPEN = """(url) => {
  const got = (window.__got = { events: [], opens: 0, errors: [] });
  const source = (window.__source = new EventSource(url));
  const types = ["operation.started", "operation.progress", "operation.completed",
    "operation.failed", "operation.cancelled", "stream.reset", "message"];
  for (const type of types) {
    source.addEventListener(type, (event) =>
      got.events.push({ type: event.type, id: event.lastEventId, data: event.data }));
  }
  source.onopen = () => { got.opens += 1; };
  source.onerror = () => { got.errors.push(source.readyState); };
}"""
# The same on the user's stream.
OPEN_USER = OPEN.replace('"stream.reset", "message"', '"stream.reset", "subscription.updated"')
RETRY_SECONDS = StreamOptions().retry_ms / 1000
STATE = "() => ({ ...window.__got, readyState: window.__source.readyState })"


async def received(page: Page) -> dict[str, Any]:
    state: dict[str, Any] = await page.evaluate(STATE)
    return state


async def test_eventsource_resumes_by_last_event_id_and_stops_after_204(
    settings: Settings, page: Page, page_errors: list[str]
) -> None:
    admin = settings.provisioning_servers[0].dsn
    gated = GatedBackend(GraphBackend(admin), hold_after=["create_role"])
    backends: list[Any] = [gated, SharedRepositoryBackend(admin)]
    async with (
        running_stack(settings, backends=backends) as stack,
        dropping_proxy(stack.url) as proxy,
    ):
        try:
            started = await stack.checkout("graph-standard", "raw-eventsource")
            await stack.pay(started["checkout_session_id"])
            await gated.held_at("create_role")
            op_id = await operation_id_of(stack, started["subscription_id"])
            path = f"/v1/operations/{op_id}/events"
            token = (await stack.http.post("/v1/stream-tokens")).json()["token"]

            asked: list[str] = []

            def on_request(request: Request) -> None:
                if path in request.url:
                    asked.append(request.url)

            page.on("request", on_request)
            await page.goto(f"{proxy.url}/healthz")  # any page of the app's origin
            await page.evaluate(OPEN, f"{path}?token={token}")
            # The history so far arrives: up to the step being held.
            await page.wait_for_function(
                "() => window.__got.events.some((e) => e.data.includes('\"create_role\"'))"
            )
            before = await received(page)
            assert before["opens"] == 1

            # The connection is cut under it: the browser reconnects by itself.
            assert proxy.drop() >= 1
            await page.wait_for_function("() => window.__got.opens === 2")
            gated.release("create_role")
            # After the terminal event the server ends the stream; the browser asks once more
            # with the terminal id, gets 204, and gives up for good (CLOSED).
            await page.wait_for_function("() => window.__source.readyState === 2")
        finally:
            gated.release_all()

        after = await received(page)
        events = await server_events(stack, op_id)
        assert [e["id"] for e in after["events"]] == [e.id for e in events]
        assert [e["type"] for e in after["events"]] == [e.type for e in events]
        for got in after["events"]:
            data = json.loads(got["data"])
            assert data["type"] == got["type"]
            assert data["operation_id"] == op_id
        assert events[-1].type == "operation.completed"

        # On the wire: the first request had no position; the one after the cut resumed
        # right after the last event received; the last one came after the terminal event.
        requests = proxy.requests(path)
        assert len(requests) == 3
        assert "last-event-id" not in requests[0].headers
        assert requests[1].headers["last-event-id"] == before["events"][-1]["id"]
        assert requests[2].headers["last-event-id"] == events[-1].id
        answer = await stack.http.get(path, headers={"Last-Event-ID": events[-1].id})
        assert answer.status_code == 204
        assert after["opens"] == 2
        assert after["errors"][-1] == 2  # the 204 closed it; no reconnection is pending
        # Longer than the `retry:` the stream sent (3 s): a browser still trying would have.
        await anyio.sleep(RETRY_SECONDS * 1.3)
        assert len(asked) == 3
        assert len(proxy.requests(path)) == 3
        assert page_errors == []


async def test_eventsource_keeps_coming_back_through_a_redis_outage(
    settings: Settings, page: Page, page_errors: list[str], tmp_path: Path
) -> None:
    """Opened while Redis is down, the browser's own EventSource gets 200 with `retry:` and a
    close, not an error status that would end it for good; once Redis is back it is served, and
    a stream opened without a position never begins with stream.reset."""
    with redis_process(tmp_path / "redis") as server:
        await server.wait_ready()
        async with running_stack(replace(settings, redis_url=server.url)) as stack:
            token = (await stack.http.post("/v1/stream-tokens")).json()["token"]
            await page.goto(f"{stack.url}/healthz")
            server.kill()
            await page.evaluate(OPEN_USER, f"/v1/events?token={token}")
            # Two failed attempts, and the browser is still trying (CONNECTING, not CLOSED).
            await page.wait_for_function(
                "() => window.__got.errors.length >= 2 || window.__source.readyState === 2"
            )
            outage = await received(page)
            assert outage["readyState"] != 2, outage
            assert set(outage["errors"]) == {0}

            server.start()
            await server.wait_ready()
            services = stack.app.state.services
            topic = user_topic(stack.user_id)
            sent: list[str] = []
            with anyio.fail_after(30):
                while not (await received(page))["events"]:
                    event = Event.create("subscription.updated", subscription_id="sub_x")
                    with contextlib.suppress(RedisError):  # the app's pool may still reconnect
                        sent.append((await services.publisher.publish(event, [topic]))[topic])
                    await anyio.sleep(0.5)
            after = await received(page)
            assert after["readyState"] == 1
            assert [e["type"] for e in after["events"]] == ["subscription.updated"]
            assert after["events"][0]["id"] in sent
        assert page_errors == []
