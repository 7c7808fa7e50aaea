"""PackedConnection: the commands hiredis packs are the bytes redis-py would send, and a client
made of them works as redis-py's own (the publisher's script call included)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from streams import Event, EventPublisher, stream_key, user_topic
from streams.connection import PackedConnection

pytestmark = pytest.mark.anyio

ARGUMENTS: list[tuple[Any, ...]] = [
    ("SET", "k", "v"),
    ("CONFIG GET", "maxmemory"),  # a command name of two words
    (b"CONFIG GET", "maxmemory"),
    ("SET", b"k", memoryview(b"abc")),
    ("X", 0, 1, -5, 2**70, 0.1, 1e16, 1.5e-7, -0.0, 3.0, float("inf")),
    ("X", "héllo ☃ 😀", "", b"", "a\r\nb"),
    ("X", bytearray(b"hiredis takes no bytearray")),
]


@pytest.mark.parametrize("args", ARGUMENTS)
def test_packs_the_bytes_redis_py_packs(args: tuple[Any, ...]) -> None:
    ours = b"".join(PackedConnection().pack_command(*args))
    assert ours == b"".join(bytes(part) for part in Connection().pack_command(*args))


@pytest.mark.parametrize("value", [None, True, object(), [1]])
def test_refuses_what_redis_py_refuses(value: object) -> None:
    with pytest.raises(DataError, match="Invalid input"):
        PackedConnection().pack_command("SET", "k", value)  # type: ignore[arg-type]


@pytest.fixture
async def packed(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, connection_class=PackedConnection)
    yield client
    await client.aclose()


@pytest.fixture
async def plain(redis_url: str) -> AsyncIterator[Redis]:
    """A client of redis-py's own connections, to read back (a single Redis only: the streams
    tests' ``redis`` is a cluster's too)."""
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_a_client_of_packed_connections_talks_to_redis(
    packed: Redis, plain: Redis, redis_prefix: str
) -> None:
    key = f"{redis_prefix}packed"
    await packed.set(key, "héllo ☃")
    assert await plain.get(key) == "héllo ☃".encode()
    async with packed.pipeline(transaction=True) as pipe:
        pipe.rpush(f"{key}:list", b"a", 2, 0.5, memoryview(b"m"))
        pipe.lrange(f"{key}:list", 0, -1)
        replies = await pipe.execute()
    assert replies == [4, [b"a", b"2", b"0.5", b"m"]]
    assert "maxmemory" in await packed.config_get("maxmemory")


async def test_the_publisher_publishes_through_packed_connections(
    packed: Redis, plain: Redis, redis_prefix: str
) -> None:
    publisher = EventPublisher(packed, prefix=redis_prefix, batch_entries=3)
    topics = [user_topic(f"usr_{n}") for n in range(4)]
    events = [Event.create("subscription.updated", n=n, text="é\n") for n in range(8)]
    answers = await publisher.publish_many([(event, topics[:2]) for event in events])
    for topic in topics[:2]:
        entries: Any = await plain.xrange(stream_key(redis_prefix, topic))
        assert [entry_id.decode() for entry_id, _ in entries] == [ids[topic] for ids in answers]
        assert [json.loads(fields[b"d"]) for _, fields in entries] == [
            dict(event.data) for event in events
        ]
