from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from bench.chaos.proxy import FaultProxy, fault_proxy, url_through
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
from tests.streams.sse_client import wait_until
from tests.streams.vocabulary import TERMINAL_TYPES
from tests.support.redis_server import redis_process

pytestmark = pytest.mark.anyio

ISO_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@dataclass
class _Unencodable:
    """A dataclass: not JSON, as for the json module (orjson would write it)."""

    x: int = 1


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


def test_iso_now_is_the_current_millisecond() -> None:
    for _ in range(2000):  # many calls within one millisecond, and across several
        before = int(time.time() * 1000)
        text = iso_now()
        after = int(time.time() * 1000)
        assert ISO_Z.fullmatch(text)
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        assert before <= round(moment.timestamp() * 1000) <= after
    assert Event.create("a", ts="given").data["ts"] == "given"


def test_create_refuses_a_second_type_and_unencodable_data() -> None:
    with pytest.raises(ValueError, match="once"):
        Event.create("a", **{"type": "b"})
    with pytest.raises(EventEncodingError, match="not JSON"):
        Event.create("a", thing=object()).encode()


def test_encoding_writes_the_json_the_json_module_wrote() -> None:
    # Event.encode uses orjson and hands what orjson refuses to the json module: the JSON
    # that SSE clients see is the json module's compact, UTF-8 one, byte for byte here.
    reference = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
    view = MappingProxyType({"nested": [1, 2]})
    data: dict[str, Any] = {
        "text": 'a\nb\t"q"\\ \u2028 \x00\x7f héllo ☃ 😀',
        "numbers": [0, -1, 2**63 - 1, -(2**63), 0.1, 100.0, -0.0, 1e16, 2.5e-300],
        "flags": [True, False, None],
        "tuple": (1, "two"),
        "nested": {"a": [{"b": {}}, []]},
    }
    cases: list[dict[str, Any]] = [
        data,
        {"deep": json.loads("[" * 300 + "]" * 300)},  # beyond orjson's nesting limit
        {"huge": 2**70},  # beyond 64 bits: orjson refuses, the json module writes it
        {"keys": {1: "a", 2.5: "b", False: "c", None: "d"}},  # keys that are not str
    ]
    for case in cases:
        assert Event("t", case).encode() == reference.encode(case).encode()
    moment = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert json.loads(Event("t", {"at": moment, "view": view}).encode()) == {
        "at": "2026-01-02T03:04:05.678Z",
        "view": {"nested": [1, 2]},
    }
    # A float may be spelt differently, as the same number.
    assert json.loads(Event("t", {"f": 1e-7}).encode()) == {"f": 1e-7}
    # NaN is not JSON: it is written as null (the json module wrote NaN, which
    # JSON.parse refuses).
    assert json.loads(Event("t", {"f": math.nan, "g": -math.inf}).encode()) == {
        "f": None,
        "g": None,
    }


@pytest.mark.parametrize(
    "value",
    [object(), {1, 2}, b"bytes", datetime(2026, 1, 1), "\ud800", _Unencodable()],
    ids=["object", "set", "bytes", "naive-datetime", "lone-surrogate", "dataclass"],
)
def test_data_that_is_not_json_is_refused(value: object) -> None:
    with pytest.raises(EventEncodingError, match="not JSON"):
        Event("t", {"value": value}).encode()
    looped: list[object] = []
    looped.append(looped)
    with pytest.raises(EventEncodingError, match="not JSON"):
        Event("t", {"value": looped}).encode()


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


async def test_each_published_event_is_reported_once_whichever_method_published_it(
    redis: RedisClient, redis_prefix: str
) -> None:
    reported: list[str] = []
    publisher = EventPublisher(
        redis,
        prefix=redis_prefix,
        terminal_types=TERMINAL_TYPES,
        on_published=lambda event: reported.append(event.type),
    )
    op, user = operation_topic("op_counted"), user_topic("usr_counted")
    await publisher.publish(Event.create("operation.started", operation_id="op_counted"), [op])
    await publisher.publish(Event.create("subscription.updated"), [user])
    await publisher.publish_many(
        [
            (Event.create("operation.progress", progress=50), [op, user]),
            (Event.create("operation.completed", operation_id="op_counted"), [op, user]),
        ]
    )
    assert reported == [
        "operation.started",
        "subscription.updated",
        "operation.progress",
        "operation.completed",
    ]


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


# Coalescing: calls made while another is on its way share script calls. On a single Redis
# only: on a Redis Cluster each call goes by itself, one script call per slot (a batch of
# several callers' topics would span slots).
single_redis = pytest.mark.parametrize("redis_mode", ["single"])


def _progress(n: int) -> Event:
    return Event.create("operation.progress", n=n)


async def _numbers(redis: RedisClient, key: str) -> list[int]:
    entries: Any = await redis.xrange(key)
    return [json.loads(fields[b"d"])["n"] for _, fields in entries]


@single_redis
async def test_concurrent_publishes_share_script_calls_and_keep_their_order(
    redis: Redis, redis_prefix: str
) -> None:
    publisher = EventPublisher(
        redis, prefix=redis_prefix, terminal_types=TERMINAL_TYPES, batch_entries=8
    )
    shared = user_topic("usr_many")
    # Tasks run in the order they were made, so the calls are made in the order of n.
    tasks = [
        asyncio.create_task(publisher.publish(_progress(n), [shared, operation_topic(f"op_{n}")]))
        for n in range(100)
    ]
    answers = await asyncio.gather(*tasks)
    # Two entries each, at most 8 per call: 25 calls, where one each would have made 100.
    assert publisher.stats.calls == 25 and publisher.stats.entries == 200
    assert await _numbers(redis, stream_key(redis_prefix, shared)) == list(range(100))
    entries: Any = await redis.xrange(stream_key(redis_prefix, shared))
    assert [a[shared] for a in answers] == [entry_id.decode() for entry_id, _ in entries]
    for n, answer in enumerate(answers):
        own: Any = await redis.xrange(stream_key(redis_prefix, operation_topic(f"op_{n}")))
        assert [entry_id.decode() for entry_id, _ in own] == [answer[operation_topic(f"op_{n}")]]

    # One caller's events are never split: more than a batch goes alone, in one atomic call.
    calls = publisher.stats.calls
    await publisher.publish_many([(_progress(n), [shared]) for n in range(100, 120)])
    assert publisher.stats.calls == calls + 1
    assert await _numbers(redis, stream_key(redis_prefix, shared)) == list(range(120))


@single_redis
async def test_a_script_error_reaches_every_caller_it_carried(
    redis: Redis, redis_prefix: str
) -> None:
    publisher = EventPublisher(
        redis, prefix=redis_prefix, terminal_types=TERMINAL_TYPES, batch_entries=2
    )
    broken = operation_topic("op_broken")
    await redis.set(stream_key(redis_prefix, broken), "not a stream")  # WRONGTYPE in the script
    topics = [operation_topic("op_a"), broken, operation_topic("op_b"), operation_topic("op_c")]
    tasks = [
        asyncio.create_task(publisher.publish(_progress(n), [topic]))
        for n, topic in enumerate(topics)
    ]
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    # The first call carried op_a and the broken topic: both callers get Redis's error (op_a's
    # event may be kept, as after a connection lost with the reply on its way).
    for outcome in outcomes[:2]:
        assert isinstance(outcome, ResponseError) and "WRONGTYPE" in str(outcome)
    # The next call is unaffected.
    for topic, outcome in zip(topics[2:], outcomes[2:], strict=True):
        assert isinstance(outcome, dict) and list(outcome) == [topic]
    assert publisher.stats.calls == 2


async def test_a_connection_error_reaches_every_caller() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nowhere = Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0))
    publisher = EventPublisher(nowhere, terminal_types=TERMINAL_TYPES)
    try:
        for _ in range(2):  # a failed flush leaves nothing behind: the next calls fail alike
            tasks = [
                asyncio.create_task(publisher.publish(_progress(n), [operation_topic("op_x")]))
                for n in range(5)
            ]
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(o, RedisConnectionError) for o in outcomes), outcomes
    finally:
        await nowhere.aclose()


@single_redis
@pytest.mark.parametrize("batch_entries", [1, 512])
async def test_a_terminal_event_still_ends_its_topic_when_calls_are_coalesced(
    redis: Redis, redis_prefix: str, batch_entries: int
) -> None:
    publisher = EventPublisher(
        redis, prefix=redis_prefix, terminal_types=TERMINAL_TYPES, batch_entries=batch_entries
    )
    op, user = operation_topic("op_end"), user_topic("usr_end")
    events = [
        Event.create("operation.started", operation_id="op_end"),
        Event.create("operation.completed", operation_id="op_end"),
        Event.create("operation.progress", operation_id="op_end", progress=50),  # late
        Event.create("subscription.updated", subscription_id="sub_1"),
    ]
    topics = [[op, user], [op, user], [op, user], [user]]
    tasks = [
        asyncio.create_task(publisher.publish(event, t))
        for event, t in zip(events, topics, strict=True)
    ]
    started, completed, late, updated = await asyncio.gather(*tasks)
    # All four in one script call, or each in its own (a call's events are never split).
    assert publisher.stats.calls == (1 if batch_entries == 512 else 4)
    # Dropped from every topic, and answered, for each, with the id of the terminal event that
    # ended the operation's topic (the user's copy has an id of its own: equal only when both
    # were written in the same millisecond).
    assert late == {op: completed[op], user: completed[op]}
    op_entries: Any = await redis.xrange(stream_key(redis_prefix, op))
    assert [e[1][b"t"] for e in op_entries] == [b"operation.started", b"operation.completed"]
    user_entries: Any = await redis.xrange(stream_key(redis_prefix, user))
    assert [e[0].decode() for e in user_entries] == [
        started[user],
        completed[user],
        updated[user],
    ]


@contextlib.asynccontextmanager
async def _stalled_publisher(
    redis_url: str, prefix: str, topic: str
) -> AsyncIterator[tuple[EventPublisher, FaultProxy]]:
    """A publisher (2 entries per call) whose Redis stalls (behind a proxy) once it has
    published event -1 to ``topic``: connected, its script loaded."""
    async with fault_proxy("redis", redis_url) as proxy:
        through = Redis.from_url(url_through(redis_url, proxy.port))
        publisher = EventPublisher(
            through, prefix=prefix, terminal_types=TERMINAL_TYPES, batch_entries=2
        )
        try:
            await publisher.publish(_progress(-1), [topic])
            proxy.stall()
            yield publisher, proxy
        finally:
            await through.aclose()


@single_redis
async def test_a_cancelled_caller_loses_or_duplicates_nothing_of_the_others(
    redis: Redis, redis_url: str, redis_prefix: str
) -> None:
    topic = user_topic("usr_cancel")
    async with _stalled_publisher(redis_url, redis_prefix, topic) as (publisher, proxy):
        calls = publisher.stats.calls
        first = [asyncio.create_task(publisher.publish(_progress(n), [topic])) for n in (0, 1)]
        await wait_until(lambda: publisher.stats.calls > calls)  # the first is on its way
        queued = [asyncio.create_task(publisher.publish(_progress(n), [topic])) for n in (2, 3, 4)]
        await asyncio.sleep(0)  # they make their calls, queued behind the first
        first[0].cancel()  # its events were sent: they stay published
        queued[1].cancel()  # not sent yet: nothing of it is
        proxy.unstall()
        outcomes = await asyncio.gather(*first, *queued, return_exceptions=True)
    assert isinstance(outcomes[0], asyncio.CancelledError)
    assert isinstance(outcomes[3], asyncio.CancelledError)
    kept = [o for n, o in enumerate(outcomes) if n not in (0, 3)]
    assert all(isinstance(o, dict) and list(o) == [topic] for o in kept), outcomes
    assert await _numbers(redis, stream_key(redis_prefix, topic)) == [-1, 0, 1, 2, 4]


@single_redis
async def test_a_second_call_goes_while_one_is_on_its_way_unless_it_shares_a_topic(
    redis: Redis, redis_url: str, redis_prefix: str
) -> None:
    a, b = user_topic("usr_a"), user_topic("usr_b")
    async with _stalled_publisher(redis_url, redis_prefix, a) as (publisher, proxy):
        calls = publisher.stats.calls
        tasks = [asyncio.create_task(publisher.publish(_progress(0), [a]))]
        await wait_until(lambda: publisher.stats.calls == calls + 1)
        # Another topic goes at once, on a second connection; the first topic's next event
        # waits for the call on its way (two connections may run in either order).
        tasks += [
            asyncio.create_task(publisher.publish(_progress(n), [t]))
            for n, t in ((1, b), (2, a), (3, b))
        ]
        await wait_until(lambda: publisher.stats.calls == calls + 2)
        await asyncio.sleep(0.1)
        assert publisher.stats.calls == calls + 2  # two on their way, no more
        proxy.unstall()
        await asyncio.gather(*tasks)
    assert await _numbers(redis, stream_key(redis_prefix, a)) == [-1, 0, 2]
    assert await _numbers(redis, stream_key(redis_prefix, b)) == [1, 3]


@single_redis
async def test_pipelined_calls_keep_each_topics_order(redis: Redis, redis_prefix: str) -> None:
    publisher = EventPublisher(
        redis, prefix=redis_prefix, terminal_types=TERMINAL_TYPES, batch_entries=3
    )
    topics = [user_topic(f"usr_{i}") for i in range(7)]
    # Callers of 1 or 2 topics, overlapping, in small batches: many calls, two on their way.
    calls = [[topics[n % 7]] if n % 3 else [topics[n % 7], topics[(n * 5) % 7]] for n in range(300)]
    published = [
        asyncio.create_task(publisher.publish(_progress(n), list(dict.fromkeys(t))))
        for n, t in enumerate(calls)
    ]
    await asyncio.gather(*published)
    for topic in topics:
        wanted = [n for n, t in enumerate(calls) if topic in t]
        assert await _numbers(redis, stream_key(redis_prefix, topic)) == wanted


@pytest.mark.parametrize("redis_mode", ["cluster"])
async def test_concurrent_publishes_on_a_cluster_go_one_call_per_slot(
    redis: RedisClient, redis_prefix: str
) -> None:
    publisher = EventPublisher(redis, prefix=redis_prefix, terminal_types=TERMINAL_TYPES)
    topics = [operation_topic(f"op_{n}") for n in range(20)]
    assert len({topic_slot(t) for t in topics}) > 1
    tasks = [
        asyncio.create_task(publisher.publish(_progress(n), [t])) for n, t in enumerate(topics)
    ]
    answers = await asyncio.gather(*tasks)
    # Not coalesced across callers (that would be CROSSSLOT): one script call each.
    assert publisher.stats.calls == 20 and publisher.stats.entries == 20
    for n, (topic, answer) in enumerate(zip(topics, answers, strict=True)):
        assert await _numbers(redis, stream_key(redis_prefix, topic)) == [n]
        entries: Any = await redis.xrange(stream_key(redis_prefix, topic))
        assert [entry_id.decode() for entry_id, _ in entries] == [answer[topic]]


async def test_a_retry_after_a_lost_reply_writes_nothing_twice(tmp_path: Path) -> None:
    # A server of the test's own, paused (SIGSTOP) with the publish on its way: the caller gives
    # up (its read timeout), the server runs the script when it wakes, and the caller's retry
    # of the same Event finds it written in both topics.
    with redis_process(tmp_path / "redis", persistence="none") as server:
        await server.wait_ready()
        client = Redis(
            host="127.0.0.1", port=server.port, socket_timeout=0.3, retry=Retry(NoBackoff(), 0)
        )
        publisher = EventPublisher(client, prefix="t:", terminal_types=TERMINAL_TYPES)
        topics = [operation_topic("op_lost"), user_topic("usr_lost")]
        try:
            before = _progress(0)
            await publisher.publish(before, topics)  # connected, script loaded
            calls = await _script_calls(client)
            event = _progress(1)
            server.pause()
            try:
                with pytest.raises(RedisError):
                    await publisher.publish(event, topics)
            finally:
                server.resume()
            ids = await publisher.publish(event, topics)
            # The paused call and the retry both ran; the event was written once.
            assert await _script_calls(client) - calls == 2
            for topic in topics:
                entries: Any = await client.xrange(stream_key("t:", topic))
                assert [e[1][b"k"].decode() for e in entries] == [before.key, event.key]
                assert ids[topic] == entries[-1][0].decode()
        finally:
            await client.aclose()


async def _script_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
