from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from streams import Event, EventPublisher, RedisClient, operation_topic, stream_key, user_topic
from streams.hub import EventHub
from streams.routing import DirectRoutes
from streams.sse import EventStreamResponse, StreamOptions
from tests.streams.sse_client import SSEItem, collect, read_sse, wait_until
from tests.streams.support import Snapshots, make_app
from tests.streams.vocabulary import TERMINAL_TYPES
from tests.support.live import live_server

pytestmark = pytest.mark.anyio


def progress(op: str, n: int) -> Event:
    return Event.create("operation.progress", operation_id=op, step=f"s{n}", progress=n, message="")


def done(op: str) -> Event:
    return Event.create("operation.completed", operation_id=op)


def events(items: list[SSEItem]) -> list[SSEItem]:
    return [i for i in items if i.kind == "event"]


async def test_late_join_gets_the_whole_history_then_live_then_closes(
    app: Starlette, publisher: EventPublisher, hub: EventHub
) -> None:
    topic = operation_topic("op_late")
    ids = [(await publisher.publish(progress("op_late", n), [topic]))[topic] for n in range(3)]
    async with live_server(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as client:
        async with client.stream("GET", "/ops/op_late/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            items: list[SSEItem] = []
            with anyio.fail_after(10):
                async for item in read_sse(response):
                    items.append(item)
                    if len(events(items)) == 3:
                        ids.append((await publisher.publish(done("op_late"), [topic]))[topic])
        assert items[0].kind == "retry"  # every stream begins with retry:
        got = events(items)
        assert [i.id for i in got] == ids
        assert [i.event for i in got] == ["operation.progress"] * 3 + ["operation.completed"]
        assert [i.json["progress"] for i in got[:3]] == [0, 1, 2]
        assert all(i.json["operation_id"] == "op_late" and i.json["ts"] for i in got)

        # A reconnect with the terminal event's id: nothing more will come.
        reply = await client.get("/ops/op_late/events", headers={"Last-Event-ID": ids[-1]})
        assert reply.status_code == 204
        # Without a position: the whole history again, and the stream closes by itself.
        status, again = await collect(client, "/ops/op_late/events")
        assert status == 200
        assert [i.id for i in events(again)] == ids
    await wait_until(lambda: hub.subscriber_count() == 0)


async def test_resume_by_last_event_id_has_no_gap_and_no_duplicate(
    app: Starlette, publisher: EventPublisher
) -> None:
    topic = operation_topic("op_resume")
    total = 150
    published: list[str] = []

    async def publish_all() -> None:
        for n in range(total):
            published.append((await publisher.publish(progress("op_resume", n), [topic]))[topic])
            await anyio.sleep(0.002)
        published.append((await publisher.publish(done("op_resume"), [topic]))[topic])

    received: list[SSEItem] = []
    async with (
        live_server(app) as base,
        httpx.AsyncClient(base_url=base, timeout=10) as client,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(publish_all)
        position: str | None = None
        for attempt in range(100):
            # Alternate the header and the query parameter; drop the connection every 20 events.
            url, headers = "/ops/op_resume/events", {}
            if position and attempt % 2:
                headers["Last-Event-ID"] = position
            elif position:
                url += f"?last_event_id={position}"
            async with client.stream("GET", url, headers=headers) as response:
                if response.status_code == 204:
                    break
                seen = 0
                async for item in read_sse(response):
                    if item.kind == "event":
                        received.append(item)
                        position = item.id
                        seen += 1
                        if seen == 20:
                            break
            if received and received[-1].event == "operation.completed":
                break
    assert [i.id for i in received] == published
    assert [i.json["progress"] for i in received[:-1]] == list(range(total))


async def test_user_stream_is_live_and_replays_after_a_position(
    app: Starlette, publisher: EventPublisher
) -> None:
    topic = user_topic("usr_1")
    before = await publisher.publish(
        Event.create("subscription.updated", subscription_id="s0"), [topic]
    )
    async with live_server(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as client:
        async with client.stream("GET", "/users/usr_1/events") as response:
            items = read_sse(response)
            assert (await anext(items)).kind == "retry"
            after = await publisher.publish(
                Event.create("subscription.updated", subscription_id="s1"), [topic]
            )
            first = await anext(items)
            assert (first.id, first.json["subscription_id"]) == (after[topic], "s1")
        headers = {"Last-Event-ID": before[topic]}
        async with client.stream("GET", "/users/usr_1/events", headers=headers) as response:
            items = read_sse(response)
            assert (await anext(items)).kind == "retry"
            assert (await anext(items)).id == after[topic]


async def test_trimmed_history_answers_stream_reset_with_a_snapshot(
    app: Starlette, redis_prefix: str, publisher: EventPublisher, snapshots: Snapshots
) -> None:
    small = EventPublisher(
        publisher._redis,
        prefix=redis_prefix,
        maxlen=5,
        exact_trim=True,
        terminal_types=TERMINAL_TYPES,
    )
    topic = operation_topic("op_trim")
    ids = [(await small.publish(progress("op_trim", n), [topic]))[topic] for n in range(20)]
    snapshots.by_topic[topic] = {"id": "op_trim", "status": "running", "progress": 19}
    async with live_server(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as client:
        for headers in ({"Last-Event-ID": ids[2]}, {}, {"Last-Event-ID": "not-an-id"}):
            async with client.stream("GET", "/ops/op_trim/events", headers=headers) as response:
                items = read_sse(response)
                assert (await anext(items)).kind == "retry"
                reset = await anext(items)
                assert reset.event == "stream.reset"
                assert reset.id == ids[-1]  # resuming after the reset continues from here
                assert reset.json["snapshot"] == snapshots.by_topic[topic]
                assert reset.json["operation_id"] == "op_trim"
                live = await small.publish(progress("op_trim", 20), [topic])
                nxt = await anext(items)
                assert (nxt.id, nxt.json["progress"]) == (live[topic], 20)
                ids.append(live[topic])

        # A finished operation whose history is gone: the reset is the last word.
        ids.append((await small.publish(done("op_trim"), [topic]))[topic])
        snapshots.by_topic[topic] = {"id": "op_trim", "status": "completed", "progress": 100}
        _, items_ = await collect(client, "/ops/op_trim/events", headers={"Last-Event-ID": ids[0]})
        assert [(i.event, i.id) for i in events(items_)] == [("stream.reset", ids[-1])]


async def test_keepalive_duration_limit_and_shutdown(hub: EventHub, snapshots: Snapshots) -> None:
    options = StreamOptions(keepalive_seconds=0.3, retry_ms=500, max_seconds=1.5)
    app = make_app(hub, snapshots, options)
    async with live_server(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as client:
        status, items = await collect(client, "/users/usr_idle/events")
        assert status == 200
        assert items[0].kind == "retry" and items[0].text == "500"
        comments = [i.text for i in items if i.kind == "comment"]
        assert "keep-alive" in comments
        assert comments[-1].startswith("stream duration limit reached")

        async with client.stream("GET", "/users/usr_idle/events") as response:
            stream = read_sse(response)
            assert (await anext(stream)).kind == "retry"
            hub.close()
            rest = [i async for i in stream]
        assert rest[-1].kind == "comment" and rest[-1].text.startswith("server shutting down")
        # While shutting down, new streams end at once so that the client goes elsewhere.
        status, items = await collect(client, "/users/usr_idle/events")
        assert [i.kind for i in items] == ["retry", "comment"]


async def test_a_disconnected_client_leaves_the_hub(app: Starlette, hub: EventHub) -> None:
    async with live_server(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as client:
        for _ in range(20):  # gone while the stream is still starting (history read, etc.)
            async with client.stream("GET", "/users/usr_gone/events"):
                pass
            async with client.stream("GET", "/ops/op_gone/events"):
                pass
        await wait_until(lambda: hub.subscriber_count() == 0)
        async with client.stream("GET", "/users/usr_gone/events") as response:
            events = read_sse(response)  # held: collected half-read, it would close the stream
            assert (await anext(events)).kind == "retry"
            assert hub.subscriber_count(user_topic("usr_gone")) == 1
        await wait_until(lambda: hub.subscriber_count(user_topic("usr_gone")) == 0)


def test_events_json_is_one_line() -> None:
    assert "\n" not in json.dumps({"a": "b\nc"})


async def test_direct_routes_serve_streams_ahead_of_the_app(
    hub: EventHub, snapshots: Snapshots, stream_options: StreamOptions, publisher: EventPublisher
) -> None:
    inner = make_app(hub, snapshots, stream_options)
    seen: list[tuple[object, dict[str, str]]] = []

    async def handler(request: Request) -> Response:
        seen.append((request.app, dict(request.path_params)))
        if request.path_params["op_id"] == "missing":
            return JSONResponse({"error": {"code": "not_found", "message": "no"}}, 404)
        return EventStreamResponse.for_operation(
            hub, request.path_params["op_id"], last_event_id=None, snapshot=snapshots
        )

    app = DirectRoutes(inner, [("/v1/operations/{op_id}/events", handler)])
    assert app.state is inner.state  # what the lifespan and tests reach through the wrapper
    topic = operation_topic("op_direct")
    ids = [
        (await publisher.publish(e, [topic]))[topic]
        for e in (progress("op_direct", 1), done("op_direct"))
    ]
    async with live_server(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as client:
        status, items = await collect(client, "/v1/operations/op_direct/events")
        assert status == 200
        assert [i.id for i in events(items)] == ids
        assert (await client.get("/v1/operations/missing/events")).status_code == 404
        # Everything else still goes through the app (and its routing): here, its 204.
        reply = await client.get("/ops/op_direct/events", headers={"Last-Event-ID": ids[-1]})
        assert reply.status_code == 204
    assert seen == [(inner, {"op_id": "op_direct"}), (inner, {"op_id": "missing"})]


async def test_a_stream_without_a_position_asked_for_no_history_and_gets_no_reset(
    hub: EventHub,
    snapshots: Snapshots,
    publisher: EventPublisher,
    redis: RedisClient,
    redis_prefix: str,
) -> None:
    # A new user (no Stream yet), and one whose Stream has expired after a history.
    gone = user_topic("usr_gone")
    await publisher.publish(Event.create("subscription.updated", subscription_id="s0"), [gone])
    await redis.delete(stream_key(redis_prefix, gone))
    # A keep-alive is written only once the stream has caught up: whatever came before it is
    # how the stream begins.
    app = make_app(hub, snapshots, StreamOptions(keepalive_seconds=0.2, max_seconds=None))
    async with live_server(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as client:
        for user in ("usr_new", "usr_gone"):
            topic = user_topic(user)
            async with client.stream("GET", f"/users/{user}/events") as response:
                items = read_sse(response)
                assert (await anext(items)).kind == "retry"
                with anyio.fail_after(10):
                    begins = [item async for item in until_keepalive(items)]
                assert begins == [], user
                sent = await publisher.publish(
                    Event.create("subscription.updated", subscription_id="s1"), [topic]
                )
                with anyio.fail_after(10):
                    first = [i async for i in until_event(items)][-1]
                assert (first.event, first.id) == ("subscription.updated", sent[topic]), user
    assert snapshots.asked == []


async def until_keepalive(items: AsyncIterator[SSEItem]) -> AsyncIterator[SSEItem]:
    """The items before the next keep-alive comment."""
    async for item in items:
        if item.kind == "comment" and item.text == "keep-alive":
            return
        yield item


async def until_event(items: AsyncIterator[SSEItem]) -> AsyncIterator[SSEItem]:
    """The next event, past comments."""
    async for item in items:
        if item.kind == "event":
            yield item
            return


async def test_a_stream_ends_once_its_access_check_says_no(
    hub: EventHub, snapshots: Snapshots
) -> None:
    """The caller's check (a revoked API key, in Lookout) is asked every `recheck_seconds`;
    False ends the stream with a comment saying why, and so does a check that keeps failing
    for `recheck_grace_seconds`; one failure alone does not."""
    answers: dict[str, list[bool | None]] = {
        "usr_revoked": [True, True, False],
        "usr_broken": [True, None],  # None: the check raises, from then on
        "usr_flaky": [True, None, True, True, True, False],
    }
    asked: list[str] = []
    options = StreamOptions(
        keepalive_seconds=15, max_seconds=None, recheck_seconds=0.1, recheck_grace_seconds=0.5
    )

    async def user_events(request: Request) -> Response:
        user_id = request.path_params["user_id"]

        async def still_allowed() -> bool:
            asked.append(user_id)
            script = answers[user_id]
            answer = script.pop(0) if len(script) > 1 else script[0]
            if answer is None:
                raise ConnectionError("the database is away")
            return answer

        return EventStreamResponse.for_user(
            hub,
            user_id,
            last_event_id=None,
            snapshot=snapshots,
            options=options,
            still_allowed=still_allowed,
        )

    app = Starlette(routes=[Route("/users/{user_id}/events", user_events)])
    withdrawn = ("comment", "access withdrawn; this stream ends")
    async with live_server(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as client:
        for user_id in answers:
            async with client.stream("GET", f"/users/{user_id}/events") as response:
                stream = read_sse(response)
                assert (await anext(stream)).kind == "retry"
                with anyio.fail_after(5):
                    rest = [i async for i in stream]
            assert [(i.kind, i.text) for i in rest] == [withdrawn], user_id
        # Broken: ended once 0.5 s passed without a True, not at its first failure.
        assert asked.count("usr_broken") >= 4
        assert asked.count("usr_flaky") == 6  # one failure within the grace is let pass
        await wait_until(lambda: hub.subscriber_count() == 0)
