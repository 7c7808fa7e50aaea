from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Sequence

import anyio
import pytest

from streams import Event, EventPublisher, RedisClient, channel_name, operation_topic
from streams.frames import Frame
from streams.hub import EventHub, HubClosed, Signal, Subscription
from tests.streams.either_redis import hub_clients, kill_hub_connections, numsub
from tests.streams.sse_client import wait_until
from tests.streams.vocabulary import TERMINAL_TYPES

pytestmark = pytest.mark.anyio


async def frames(sub: Subscription, count: int) -> list[Frame]:
    """The next ``count`` frames, skipping keep-alive signals."""
    got: list[Frame] = []
    with anyio.fail_after(10):
        while len(got) < count:
            item = await sub.receive()
            if isinstance(item, list):
                got.extend(item)
            else:
                assert item in (Signal.IDLE, Signal.RESYNC), item
    return got


async def wait_numsub(redis: RedisClient, channel: str, expected: int) -> None:
    async def matches() -> bool:
        return await numsub(redis, channel) == expected

    await wait_until(matches)


def numbers(got: Sequence[Frame]) -> list[int]:
    return [json.loads(f.data)["n"] for f in got]


async def test_one_connection_and_reference_counted_channels(
    hub: EventHub, publisher: EventPublisher, redis: RedisClient, redis_prefix: str
) -> None:
    topic = operation_topic("op_ref")
    channel = channel_name(redis_prefix, topic)
    async with hub.subscribe(topic) as first, hub.subscribe(topic) as second:
        assert await numsub(redis, channel) == 1  # one Redis subscription for both
        await publisher.publish(Event.create("operation.progress", n=1), [topic])
        assert numbers(await frames(first, 1)) == [1]
        assert numbers(await frames(second, 1)) == [1]
        # The same encoded bytes go to every client of the topic.
        first.close()
        assert hub.subscriber_count(topic) == 1
        await publisher.publish(Event.create("operation.progress", n=2), [topic])
        assert numbers(await frames(second, 1)) == [2]  # one leaving never cuts the other
        assert await numsub(redis, channel) == 1
    await wait_numsub(redis, channel, 0)  # the last one leaving unsubscribes
    # One pub/sub connection for the process (on a cluster: for the one primary it needed).
    assert len(await hub_clients(redis, hub.name)) == 1


async def test_frames_are_encoded_once_and_shared(hub: EventHub, publisher: EventPublisher) -> None:
    topic = operation_topic("op_share")
    async with hub.subscribe(topic) as a, hub.subscribe(topic) as b:
        ids = await publisher.publish(Event.create("operation.started", n=0), [topic])
        [fa], [fb] = await frames(a, 1), await frames(b, 1)
        assert fa is fb
        assert fa.id == ids[topic]
        assert fa.wire.startswith(f"id: {ids[topic]}\nevent: operation.started\ndata: {{".encode())


async def test_a_full_queue_cuts_off_only_the_slow_client(
    redis: RedisClient, redis_prefix: str, publisher: EventPublisher
) -> None:
    topic = operation_topic("op_slow")
    async with (
        EventHub(redis, prefix=redis_prefix, queue_size=4, terminal_types=TERMINAL_TYPES) as hub,
        hub.subscribe(topic) as slow,
        hub.subscribe(topic) as fast,
    ):
        terminated: list[Signal] = []
        slow.on_terminal = terminated.append
        got: list[Frame] = []
        for n in range(20):
            await publisher.publish(Event.create("operation.progress", n=n), [topic])
            got.extend(await frames(fast, 1))
        assert numbers(got) == list(range(20))
        assert slow.state is Signal.OVERFLOW
        assert terminated == [Signal.OVERFLOW]
        assert await slow.receive() is Signal.OVERFLOW  # no frame after the overflow
        slow.close()
        assert hub.stats.slow_clients_dropped == 1
        assert hub.stats.offered >= 20


async def test_two_hubs_deliver_each_others_events(
    redis: RedisClient, new_redis: Callable[..., RedisClient], redis_prefix: str
) -> None:
    other = new_redis()  # another instance's client
    async with (
        EventHub(redis, prefix=redis_prefix, name="hub-a", terminal_types=TERMINAL_TYPES) as hub_a,
        EventHub(other, prefix=redis_prefix, name="hub-b", terminal_types=TERMINAL_TYPES) as hub_b,
    ):
        topic = operation_topic("op_two")
        pub_a = EventPublisher(redis, prefix=redis_prefix, terminal_types=TERMINAL_TYPES)
        pub_b = EventPublisher(other, prefix=redis_prefix, terminal_types=TERMINAL_TYPES)
        async with hub_a.subscribe(topic) as on_a, hub_b.subscribe(topic) as on_b:
            await pub_a.publish(Event.create("operation.progress", n=1), [topic])
            await pub_b.publish(Event.create("operation.progress", n=2), [topic])
            assert numbers(await frames(on_a, 2)) == [1, 2]
            assert numbers(await frames(on_b, 2)) == [1, 2]


async def test_reconnects_and_asks_subscribers_to_catch_up(
    redis: RedisClient, redis_prefix: str, publisher: EventPublisher
) -> None:
    name = f"hub-{secrets.token_hex(4)}"
    topic = operation_topic("op_drop")
    async with EventHub(
        redis, prefix=redis_prefix, name=name, backoff_min=0.3, terminal_types=TERMINAL_TYPES
    ) as hub:
        await hub.wait_connected()
        async with hub.subscribe(topic) as sub:
            await publisher.publish(Event.create("operation.progress", n=1), [topic])
            [first] = await frames(sub, 1)
            assert await kill_hub_connections(redis, name) == 1
            # Published while the hub is away: pub/sub loses it, the Stream keeps it.
            await publisher.publish(Event.create("operation.progress", n=2), [topic])
            with anyio.fail_after(10):
                while (item := await sub.receive()) is not Signal.RESYNC:
                    assert item is Signal.IDLE
            assert hub.reconnects == 1
            page = await hub.history.read_after(topic, first.position)
            assert numbers(page.frames) == [2]
            assert not page.reset
            await publisher.publish(Event.create("operation.progress", n=3), [topic])
            assert numbers(await frames(sub, 1)) == [3]


async def test_close_ends_every_subscription(hub: EventHub) -> None:
    sub = hub.subscribe(operation_topic("op_close"))
    await sub.ready()
    hub.close()
    assert await sub.receive() is Signal.CLOSED
    with pytest.raises(HubClosed):
        hub.subscribe(operation_topic("op_late"))
    sub.close()


async def test_keepalive_and_deadline_signals(hub: EventHub) -> None:
    async with hub.subscribe(operation_topic("op_idle"), keepalive=0.2, max_seconds=1.0) as sub:
        assert await sub.receive() is Signal.IDLE
        with anyio.fail_after(5):
            while (item := await sub.receive()) is Signal.IDLE:
                pass
        assert item is Signal.EXPIRED
