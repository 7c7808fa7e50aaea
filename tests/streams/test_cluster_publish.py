"""An event of an operation goes to two topics, which a Redis Cluster keeps in two slots on two
primaries: written in two calls, not one atomic one. A primary killed or paused between them,
or a process that dies there, leaves each topic with the event once the node is back and the
publish is retried, and a terminal event that reached only the operation's topic is copied to
the user's by the next publish of the operation's end.

Each test makes a cluster of its own whose slots stay served while one primary is away
(``cluster-require-full-coverage no``), so the first call succeeds and the second fails."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import RedisError

from streams import Event, EventPublisher, RedisClient, operation_topic, stream_key, user_topic
from tests.streams.either_redis import connect
from tests.streams.vocabulary import TERMINAL_TYPES
from tests.support.redis_cluster import LocalCluster, local_cluster
from tests.support.redis_server import RedisProcess

pytestmark = pytest.mark.anyio

PREFIX = "t:"


@dataclass
class Split:
    """An operation's topic and its user's, on two primaries; ``second`` serves the user's."""

    cluster: LocalCluster
    client: RedisClient
    publisher: EventPublisher
    op: str
    user: str
    second: RedisProcess

    @property
    def topics(self) -> list[str]:
        return [self.op, self.user]

    async def entries(self, topic: str) -> list[tuple[str, str, str]]:
        """The topic's Stream: (id, event key, JSON) per entry, oldest first."""
        found = []
        stream: Any = await self.client.xrange(stream_key(PREFIX, topic))
        for entry_id, fields in stream:
            found.append((entry_id.decode(), fields[b"k"].decode(), fields[b"d"].decode()))
        return found

    async def keys(self, topic: str) -> list[str]:
        return [key for _, key, _ in await self.entries(topic)]

    def back(self) -> None:
        """The second primary serves its slots again (it keeps its writes: append-only)."""
        if not self.second.running:
            self.second.start()
        self.cluster.wait_ok()


@contextlib.asynccontextmanager
async def split(tmp_path: Path, **client_options: Any) -> AsyncIterator[Split]:
    options = ("--cluster-require-full-coverage", "no")
    with local_cluster(tmp_path / "cluster", options=options) as cluster:
        client = connect(cluster.url, "cluster", **client_options)
        try:
            # The first user whose topic is served by another primary than its operation's,
            # and not by the node the client was given.
            for n in range(100):
                op, user = operation_topic(f"op_{n}"), user_topic(f"usr_{n}")
                first = cluster.primary_of(stream_key(PREFIX, op))
                second = cluster.primary_of(stream_key(PREFIX, user))
                if first is not second and second is not cluster.primaries[0]:
                    break
            publisher = EventPublisher(client, prefix=PREFIX, terminal_types=TERMINAL_TYPES)
            yield Split(cluster, client, publisher, op, user, second)
        finally:
            await client.aclose()


def progress(n: int) -> Event:
    return Event.create("operation.progress", n=n)


async def test_the_second_primary_down_fails_the_publish_and_its_retry_writes_each_topic_once(
    tmp_path: Path,
) -> None:
    async with split(tmp_path) as s:
        before = progress(0)
        await s.publisher.publish(before, s.topics)
        s.second.kill()
        event = progress(1)
        # Not a success: the caller's retry (or its outbox) is told, as on a single Redis.
        with pytest.raises(RedisError):
            await s.publisher.publish(event, s.topics)
        # The first call's write stays.
        assert await s.keys(s.op) == [before.key, event.key]
        s.back()
        ids = await s.publisher.publish(event, s.topics)  # the caller's retry: the same Event
        op_entries = await s.entries(s.op)
        assert [key for _, key, _ in op_entries] == [before.key, event.key]  # not twice
        assert ids[s.op] == op_entries[-1][0]  # answered with the entry it had
        user_entries = await s.entries(s.user)
        assert [key for _, key, _ in user_entries] == [before.key, event.key]
        assert ids[s.user] == user_entries[-1][0]
        assert user_entries[-1][2] == op_entries[-1][2] == event.encode().decode()


async def test_the_second_primary_paused_runs_every_copy_it_was_sent_and_writes_once(
    tmp_path: Path,
) -> None:
    # A short read timeout: the publish gives up on the paused node within seconds, and
    # redis-py sends the call again on new connections meanwhile; the node keeps them all.
    async with split(tmp_path, socket_timeout=0.3, socket_connect_timeout=0.3) as s:
        before = progress(0)
        await s.publisher.publish(before, s.topics)
        calls_before = await _script_calls(s.second)
        event = progress(1)
        s.second.pause()  # SIGSTOP: connections stay open and nothing answers
        try:
            with pytest.raises(RedisError):
                await s.publisher.publish(event, s.topics)
        finally:
            s.second.resume()
        s.back()
        await s.publisher.publish(event, s.topics)
        # The node ran what it was sent while paused, and the retry: several calls, one write.
        assert await _script_calls(s.second) - calls_before >= 2
        assert await s.keys(s.user) == [before.key, event.key]
        assert await s.keys(s.op) == [before.key, event.key]


async def test_a_terminal_event_cut_off_by_a_crash_is_copied_to_the_user_by_the_next_end(
    tmp_path: Path,
) -> None:
    async with split(tmp_path) as s:
        await s.publisher.publish(progress(0), s.topics)
        s.second.kill()
        done = Event.create("operation.completed", result={"ok": True})
        with pytest.raises(RedisError):
            await s.publisher.publish(done, s.topics)
        # The process dies here: nobody retries `done`. Its operation's topic has ended.
        s.back()
        assert (await s.keys(s.op))[-1] == done.key
        assert done.key not in await s.keys(s.user)
        # Another instance finalizes the operation again (it was never marked announced): a
        # new event, dropped by the ended topic, which copies the end to the user's topic.
        sweep = EventPublisher(s.client, prefix=PREFIX, terminal_types=TERMINAL_TYPES)
        again = Event.create("operation.completed", result={"ok": True})
        ids = await sweep.publish(again, s.topics)
        op_entries = await s.entries(s.op)
        assert ids == {s.op: op_entries[-1][0], s.user: op_entries[-1][0]}  # dropped
        assert op_entries[-1][1] == done.key
        user_entries = await s.entries(s.user)
        assert user_entries[-1][1:] == (done.key, done.encode().decode())
        # Once: a further end (or the same one retried) finds it there.
        await sweep.publish(Event.create("operation.failed"), s.topics)
        await s.publisher.publish(done, s.topics)
        assert await s.keys(s.user) == [key for _, key, _ in user_entries]
        assert again.key not in await s.keys(s.user)


async def _script_calls(node: RedisProcess) -> int:
    client = node.client()
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
