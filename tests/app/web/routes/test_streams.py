"""The SSE routes as a client meets them: auth by key or token, ownership, limits, resuming."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import anyio
import httpx
import pytest
from httpx_sse import aconnect_sse

from app.settings import Settings
from streams import Event, operation_topic, stream_key, user_topic
from tests.support.redis_server import redis_process
from tests.support.stack import Stack, running_stack, wait_for

pytestmark = pytest.mark.anyio


async def finished_operation(stack: Stack, name: str) -> str:
    started = await stack.checkout("graph-standard", name)
    await stack.pay(started["checkout_session_id"])
    active = await stack.wait_for_status(started["subscription_id"], "active")
    operation_id: str = active["operation_id"]
    await stack.wait_for_end_published(operation_id)
    return operation_id


async def event_ids(http: httpx.AsyncClient, path: str, **headers: str) -> list[str]:
    ids = []
    async with aconnect_sse(http, "GET", path, headers=headers) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        async for sse in source.aiter_sse():
            if sse.data:
                ids.append(sse.id)
    return ids


async def test_streams_open_with_a_token_and_resume_after_any_event(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        operation_id = await finished_operation(stack, "tokens")
        issued = await stack.http.post("/v1/stream-tokens")
        assert issued.status_code == 201
        token = issued.json()["token"]
        assert issued.json()["expires_at"].endswith("Z")

        path = f"/v1/operations/{operation_id}/events"
        everything = await event_ids(stack.anonymous, f"{path}?token={token}")
        assert len(everything) >= 3
        for cut in range(len(everything) - 1):
            rest = await event_ids(
                stack.anonymous, f"{path}?token={token}&last_event_id={everything[cut]}"
            )
            assert rest == everything[cut + 1 :]
        done = await stack.anonymous.get(f"{path}?token={token}&last_event_id={everything[-1]}")
        assert done.status_code == 204

        forged = await stack.anonymous.get(f"{path}?token={token[:-2]}xx")
        assert forged.status_code == 401
        assert forged.json()["error"]["code"] == "invalid_token"


async def test_another_users_operation_is_404(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        operation_id = await finished_operation(stack, "private")
        _, other_key = await stack.new_user("eve@example.com")
        other = {"Authorization": f"Bearer {other_key}"}
        for path in (f"/v1/operations/{operation_id}", f"/v1/operations/{operation_id}/events"):
            answer = await stack.anonymous.get(path, headers=other)
            assert answer.status_code == 404, path
            assert answer.json()["error"]["code"] == "not_found"
        token = (await stack.anonymous.post("/v1/stream-tokens", headers=other)).json()["token"]
        answer = await stack.anonymous.get(f"/v1/operations/{operation_id}/events?token={token}")
        assert answer.status_code == 404


async def test_streams_over_the_per_user_limit_are_429(settings: Settings) -> None:
    limited = replace(settings, max_streams_per_user=2)
    async with running_stack(limited) as stack:
        opened = anyio.Event()
        release = anyio.Event()
        count = 0

        async def hold() -> None:
            nonlocal count
            async with stack.http.stream("GET", "/v1/events") as answer:
                assert answer.status_code == 200
                count += 1
                if count == 2:
                    opened.set()
                await release.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            tg.start_soon(hold)
            await opened.wait()
            refused = await stack.http.get("/v1/events")
            assert refused.status_code == 429
            assert int(refused.headers["Retry-After"]) >= 1
            assert refused.json()["error"]["code"] == "too_many_streams"
            release.set()


async def test_the_user_stream_carries_subscription_updates(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        seen: list[dict[str, object]] = []
        ready = anyio.Event()

        async def listen() -> None:
            async with aconnect_sse(stack.http, "GET", "/v1/events") as source:
                ready.set()
                async for sse in source.aiter_sse():
                    if sse.event == "subscription.updated":
                        data = json.loads(sse.data)
                        seen.append(data)
                        if data["subscription"]["status"] == "active":
                            return

        async with anyio.create_task_group() as tg:
            tg.start_soon(listen)
            await ready.wait()
            await anyio.sleep(0.2)
            started = await stack.checkout("graph-standard", "watched")
            await stack.pay(started["checkout_session_id"])
        statuses = [s["subscription"]["status"] for s in seen]  # type: ignore[index]
        # Linking Stripe's ids may come first, while the payment is still pending.
        order = ["pending_payment", "provisioning", "active"]
        assert [order.index(s) for s in statuses] == sorted(order.index(s) for s in statuses)
        assert "provisioning" in statuses
        assert statuses[-1] == "active"
        last = seen[-1]
        assert last["subscription_id"] == started["subscription_id"]
        assert last["subscription"] == await stack.subscription(started["subscription_id"])


async def test_a_finished_operation_whose_history_expired_says_so(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        operation_id = await finished_operation(stack, "expired")
        services = stack.app.state.services
        await services.redis.delete(
            stream_key(stack.settings.redis_prefix, operation_topic(operation_id))
        )
        seen = []
        with anyio.fail_after(10):
            async with aconnect_sse(
                stack.http, "GET", f"/v1/operations/{operation_id}/events"
            ) as source:
                async for sse in source.aiter_sse():
                    if sse.data:
                        seen.append((sse.event, json.loads(sse.data)))
        assert [event for event, _ in seen] == ["stream.reset"]
        snapshot = seen[0][1]
        assert snapshot["snapshot"]["status"] == "completed"
        assert snapshot["snapshot"]["progress"] == 100
        assert snapshot["snapshot"]["id"] == operation_id


async def test_a_non_ascii_or_malformed_token_is_a_401_without_a_traceback(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_stack(settings) as stack:
        token = (await stack.http.post("/v1/stream-tokens")).json()["token"]
        version, payload, mac = token.split(".")
        caplog.clear()
        for bad in (
            "é",
            f"{version}.{payload}.{mac[:-1]}é",  # non-ASCII where the MAC is compared
            f"{version}.{payload}é.{mac}",
            f"{version}.{payload}",
            "v1..",
            "",
        ):
            for path in ("/v1/events", "/v1/operations/op_x/events"):
                answer = await stack.anonymous.get(path, params={"token": bad})
                assert answer.status_code == 401, (bad, answer.text)
                assert answer.json()["error"]["code"] == "invalid_token"
                assert answer.json()["error"]["message"]
        # Bytes that are not UTF-8 at all, as a browser would send them.
        answer = await stack.anonymous.get("/v1/events?token=%FF%FEv1.%C3%A9")
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "invalid_token"
        logged = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
        assert not logged, [r.getMessage() for r in logged]


async def test_streams_opened_while_redis_is_down_say_reconnect_and_work_once_it_is_back(
    settings: Settings, tmp_path: Path
) -> None:
    """A plain EventSource gives up for good on an error status: while Redis is down, each
    stream answers 200 with `retry:` and ends, so the browser keeps coming back."""
    with redis_process(tmp_path / "redis", persistence="aof") as server:
        await server.wait_ready()
        async with running_stack(replace(settings, redis_url=server.url)) as stack:
            operation_id = await finished_operation(stack, "outage")
            token = (await stack.http.post("/v1/stream-tokens")).json()["token"]
            operation_path = f"/v1/operations/{operation_id}/events?token={token}"
            user_path = f"/v1/events?token={token}"
            history = await event_ids(stack.anonymous, operation_path)

            server.kill()
            attempts: list[tuple[str, dict[str, str]]] = [
                (user_path, {}),
                (user_path, {"Last-Event-ID": history[0]}),
                (operation_path, {}),
                (operation_path, {"Last-Event-ID": history[-1]}),  # would be a 204
            ]
            for path, headers in attempts:
                with anyio.fail_after(20):
                    answer = await stack.anonymous.get(path, headers=headers)
                assert answer.status_code == 200, (path, headers, answer.text)
                assert answer.headers["content-type"].startswith("text/event-stream")
                assert answer.text.startswith("retry: "), answer.text
                assert "reconnect" in answer.text
            services = stack.app.state.services
            assert services.leases.held == 0

            server.start()
            await server.wait_ready()

            async def hub_connected() -> bool | None:
                return services.hub.connected or None

            await wait_for(hub_connected, within=20, what="the hub to reconnect")
            # What the EventSource finds when it comes back: the whole operation, and live events.
            assert await event_ids(stack.anonymous, operation_path) == history
            async with aconnect_sse(stack.anonymous, "GET", user_path) as source:
                assert source.response.status_code == 200
                sent = await services.publisher.publish(
                    Event.create("subscription.updated", subscription_id="sub_x"),
                    [user_topic(stack.user_id)],
                )
                with anyio.fail_after(10):
                    async for sse in source.aiter_sse():
                        if sse.data:
                            assert (sse.event, sse.id) == (
                                "subscription.updated",
                                sent[user_topic(stack.user_id)],
                            )
                            break


async def test_an_unreadable_entry_in_a_users_history_does_not_keep_a_stream_slot(
    settings: Settings,
) -> None:
    """Whatever happens between taking a stream's lease and serving it, the lease goes back:
    here the user's Stream ends with an entry no instance wrote (an operator's XADD)."""
    limited = replace(settings, max_streams_per_user=1)
    async with running_stack(limited) as stack:
        services = stack.app.state.services
        key = stream_key(stack.settings.redis_prefix, user_topic(stack.user_id))
        await services.redis.xadd(key, {b"t": b"\xff\xfe", b"d": b"{}"})
        statuses = []
        for _ in range(2):
            async with stack.http.stream("GET", "/v1/events") as response:
                statuses.append(response.status_code)

        async def released() -> bool | None:
            return await services.leases.count(stack.user_id) == 0 or None

        await wait_for(released, within=10, what="the stream's lease to be released")
        assert services.leases.held == 0
        assert statuses == [200, 200]
