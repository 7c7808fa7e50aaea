from __future__ import annotations

import json
import re
from typing import Any

import anyio
import pytest
from redis.crc import key_slot

from streams import (
    Event,
    EventPublisher,
    RedisClient,
    channel_name,
    operation_topic,
    stream_key,
    user_topic,
)
from streams.events import EventEncodingError, iso_now
from streams.topics import topic_slot
from tests.streams.either_redis import listen
from tests.streams.vocabulary import TERMINAL_TYPES

pytestmark = pytest.mark.anyio

ISO_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def test_create_adds_type_and_utc_timestamp() -> None:
    event = Event.create("operation.progress", operation_id="op_1", progress=40, message="a\nb")
    assert event.type == "operation.progress"
    assert event.data["type"] == "operation.progress"
    assert ISO_Z.fullmatch(event.data["ts"])
    assert ISO_Z.fullmatch(iso_now())
    encoded = event.encode()
    assert b"\n" not in encoded  # one "data:" line
    assert json.loads(encoded)["message"] == "a\nb"
    with pytest.raises(TypeError):
        event.data["progress"] = 50  # type: ignore[index]


def test_create_refuses_a_second_type_and_unencodable_data() -> None:
    with pytest.raises(ValueError, match="once"):
        Event.create("a", **{"type": "b"})
    with pytest.raises(EventEncodingError, match="not JSON"):
        Event.create("a", thing=object()).encode()


def test_topics() -> None:
    assert operation_topic("op_1") == "op:op_1"
    assert user_topic("usr_1") == "user:usr_1"
    # The topic is the hash tag of its Stream and channel: one slot on a Redis Cluster.
    assert stream_key("p:", "op:x") == "p:events:{op:x}"
    assert channel_name("p:", "op:x") == "p:{op:x}"
    assert key_slot(stream_key("p:", "op:x").encode()) == topic_slot("op:x")
    assert key_slot(channel_name("p:", "op:x").encode()) == topic_slot("op:x")


async def test_publish_appends_to_each_stream_and_announces(
    redis: RedisClient, redis_prefix: str
) -> None:
    publisher = EventPublisher(
        redis, prefix=redis_prefix, ttl_seconds=600, terminal_types=TERMINAL_TYPES
    )
    topics = [operation_topic("op_1"), user_topic("usr_1")]
    async with listen(redis, *(channel_name(redis_prefix, t) for t in topics)) as listener:
        event = Event.create("operation.started", operation_id="op_1")
        ids = await publisher.publish(event, [*topics, topics[0]])
        assert list(ids) == topics  # duplicates collapse
        announced = {channel.decode(): data for channel, data in await listener.take(2)}

    for topic in topics:
        key = stream_key(redis_prefix, topic)
        entries: Any = await redis.xrange(key)
        [(entry_id, fields)] = entries
        assert entry_id.decode() == ids[topic]
        assert fields[b"t"] == b"operation.started"
        assert json.loads(fields[b"d"]) == dict(event.data)
        assert 0 < await redis.ttl(key) <= 600
        stream_id, etype, data = announced[channel_name(redis_prefix, topic)].split(b"\n", 2)
        assert (stream_id.decode(), etype, data) == (
            ids[topic],
            b"operation.started",
            event.encode(),
        )


async def test_streams_are_capped(redis: RedisClient, redis_prefix: str) -> None:
    publisher = EventPublisher(
        redis, prefix=redis_prefix, maxlen=5, exact_trim=True, terminal_types=TERMINAL_TYPES
    )
    topic = operation_topic("op_cap")
    for n in range(12):
        await publisher.publish(Event.create("operation.progress", n=n), [topic])
    entries: Any = await redis.xrange(stream_key(redis_prefix, topic))
    assert [json.loads(f[b"d"])["n"] for _, f in entries] == [7, 8, 9, 10, 11]
    assert await publisher.publish(Event.create("x"), []) == {}


async def test_publish_many_publishes_each_event_in_order_as_publish_does(
    redis: RedisClient, redis_prefix: str
) -> None:
    # With the script gone from Redis (a restart), the first call must load it again.
    await redis.script_flush()
    publisher = EventPublisher(redis, prefix=redis_prefix, terminal_types=TERMINAL_TYPES)
    started = [Event.create("operation.started", operation_id=f"op_{n}") for n in range(3)]
    async with listen(redis, channel_name(redis_prefix, operation_topic("op_2"))) as listener:
        answers = await publisher.publish_many(
            [
                (started[0], [operation_topic("op_0"), user_topic("usr_a")]),
                (Event.create("ignored"), []),
                (started[1], [operation_topic("op_1"), user_topic("usr_a")]),
                (started[2], [operation_topic("op_2")]),
            ]
        )
        [(_, announced)] = await listener.take(1)
    assert [sorted(a) for a in answers] == [
        sorted([operation_topic("op_0"), user_topic("usr_a")]),
        [],
        sorted([operation_topic("op_1"), user_topic("usr_a")]),
        [operation_topic("op_2")],
    ]
    user_entries: Any = await redis.xrange(stream_key(redis_prefix, user_topic("usr_a")))
    assert [json.loads(f[b"d"])["operation_id"] for _, f in user_entries] == ["op_0", "op_1"]
    assert [i.decode() for i, _ in user_entries] == [
        answers[0][user_topic("usr_a")],
        answers[2][user_topic("usr_a")],
    ]
    only: Any = await redis.xrange(stream_key(redis_prefix, operation_topic("op_2")))
    [(only_id, _)] = only
    assert only_id.decode() == answers[3][operation_topic("op_2")]
    # The hub frames this announcement without reading the Stream: it must be exact.
    assert announced == b"\n".join([only_id, b"operation.started", started[2].encode()])


async def test_nothing_follows_the_end_of_an_operation(
    redis: RedisClient, redis_prefix: str
) -> None:
    """Found by the chaos soak: an `operation.started` published late (an announcement retried
    through a Redis outage, an instance woken from SIGSTOP after another finished the work)
    landed after `operation.completed`, and the operation's stream no longer ended."""
    publisher = EventPublisher(redis, prefix=redis_prefix, terminal_types=TERMINAL_TYPES)
    op, user = operation_topic("op_ended"), user_topic("usr_ended")
    started = Event.create("operation.started", operation_id="op_ended")
    await publisher.publish(started, [op, user])
    done = await publisher.publish(Event.create("operation.completed"), [op, user])

    async with listen(redis, channel_name(redis_prefix, op), channel_name(redis_prefix, user)) as (
        listener
    ):
        late = await publisher.publish_many(
            [
                (started, [op, user]),
                (Event.create("operation.completed"), [op]),
                # A user's topic goes on after one of its operations has ended.
                (Event.create("subscription.updated", subscription_id="sub_1"), [user]),
            ]
        )
        [(_, announced)] = await listener.take(1)  # one announcement only
        await anyio.sleep(0.2)
        assert await listener.take(0) == []

    assert late[0] == {op: done[op], user: done[op]} and late[1] == {op: done[op]}
    op_entries: Any = await redis.xrange(stream_key(redis_prefix, op))
    op_types = [e[1][b"t"] for e in op_entries]
    assert op_types == [b"operation.started", b"operation.completed"]
    user_entries: Any = await redis.xrange(stream_key(redis_prefix, user))
    user_types = [e[1][b"t"] for e in user_entries]
    assert user_types == [b"operation.started", b"operation.completed", b"subscription.updated"]
    assert announced.split(b"\n")[1] == b"subscription.updated"
