"""A malformed pub/sub message is skipped and counted; a crashed hub, restarted by its
supervisor, catches its subscribers up."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable

import anyio
import pytest

from streams import Event, EventPublisher, RedisClient, Supervisor, channel_name, operation_topic
from streams.hub import EventHub, Signal
from tests.streams.either_redis import hub_links, publish_by_hand
from tests.streams.sse_client import wait_until
from tests.streams.test_hub import frames, numbers
from tests.streams.vocabulary import TERMINAL_TYPES

pytestmark = pytest.mark.anyio

GARBAGE = [
    b"hello",  # one line
    b"1-1\noperation.progress",  # two lines
    b"1-1\noperation.progress\nnot json",  # data that is not a JSON object
    b'1-1\noperation.progress\n{"a":\n1}',  # a newline would break the SSE framing
    b"not-an-id\noperation.progress\n{}",  # an id that is not a Stream id
    b"1-1\nbad type\n{}",  # a space in the type
    b"\xff\xfe-1\noperation.progress\n{}",  # not UTF-8
    b"",
]


async def test_a_malformed_publish_is_skipped_and_the_next_event_arrives(
    hub: EventHub, publisher: EventPublisher, redis: RedisClient, redis_prefix: str
) -> None:
    topic = operation_topic("op_garbage")
    async with hub.subscribe(topic) as sub:
        await sub.ready()
        await publisher.publish(Event.create("operation.progress", n=1), [topic])
        assert numbers(await frames(sub, 1)) == [1]
        for garbage in GARBAGE:
            # An operator's PUBLISH by hand on a Lookout channel.
            assert await publish_by_hand(redis, channel_name(redis_prefix, topic), garbage) == 1
        await publisher.publish(Event.create("operation.progress", n=2), [topic])
        assert numbers(await frames(sub, 1)) == [2]
        assert hub.stats.malformed == len(GARBAGE)
        assert hub.reconnects == 0
        assert hub.connected


async def test_a_crashed_hub_restarts_under_its_supervisor_and_resyncs(
    redis: RedisClient,
    redis_prefix: str,
    publisher: EventPublisher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic = operation_topic("op_crash")
    supervisor = Supervisor(backoff_min=0.05, backoff_max=0.1)
    hub = EventHub(
        redis,
        prefix=redis_prefix,
        name=f"hub-{secrets.token_hex(4)}",
        terminal_types=TERMINAL_TYPES,
    )
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(supervisor.run_starting, "event-hub", hub.run)
            await hub.wait_connected()
            async with hub.subscribe(topic) as sub:
                await sub.ready()
                await publisher.publish(Event.create("operation.progress", n=1), [topic])
                [first] = await frames(sub, 1)

                # A bug on the fan-out path, once: the next keep-alive PING's answer raises.
                [link] = hub_links(hub)  # on a cluster: the one primary's
                acknowledge = link._acknowledge

                def broken(reply: object, listener: object) -> None:
                    monkeypatch.setattr(link, "_acknowledge", acknowledge)
                    raise RuntimeError("a bug in the hub")

                monkeypatch.setattr(link, "_acknowledge", broken)
                link.ping()
                await wait_until(lambda: supervisor.restarts.get("event-hub") == 1)
                # Published while the hub was down: only the Stream has it.
                await publisher.publish(Event.create("operation.progress", n=2), [topic])
                while (item := await sub.receive()) is not Signal.RESYNC:
                    assert item is Signal.IDLE or isinstance(item, list), item
                page = await hub.history.read_after(topic, first.position)
                assert [json.loads(f.data)["n"] for f in page.frames] == [2]
                await publisher.publish(Event.create("operation.progress", n=3), [topic])
                # (2 may come live too, if the hub was back before it was published.)
                while 3 not in numbers(await frames(sub, 1)):
                    pass
            supervisor.stop()  # else the closed hub's return would be restarted as a crash
            hub.close()


async def test_the_hub_outlives_the_clients_socket_timeout_while_idle(
    new_redis: Callable[..., RedisClient], redis_prefix: str
) -> None:
    # The service's client times reads out after a few seconds; the hub's pub/sub connection,
    # idle for longer, must not be cut by it (it is a connection of its own, with pings).
    client = new_redis(socket_timeout=0.5, socket_connect_timeout=2)
    publisher = EventPublisher(client, prefix=redis_prefix, terminal_types=TERMINAL_TYPES)
    topic = operation_topic("op_idle")
    async with EventHub(
        client, prefix=redis_prefix, tick_seconds=0.05, terminal_types=TERMINAL_TYPES
    ) as hub:
        await hub.wait_connected()
        async with hub.subscribe(topic) as sub:
            await sub.ready()
            await anyio.sleep(2)
            await publisher.publish(Event.create("operation.progress", n=1), [topic])
            assert numbers(await frames(sub, 1)) == [1]
            assert hub.reconnects == 0
