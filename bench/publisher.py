"""The publisher's own capacity: events/s from one process to one Redis.

    python -m bench.publisher [--publishers 2000] [--seconds 10] [--topics 10000]

``--publishers`` tasks of this one process each publish one `operation.progress` event (a
realistic ~200-byte one) to a topic of their own, wait for its Stream id, and publish the next:
the progress events of thousands of concurrent operations. `EventPublisher` coalesces them into
script calls of up to ``--batch-entries`` events. It prints events/s against the goal
(>= 50,000), the script calls and events per call, and the latency of a publish as its caller
sees it (call to Stream id). Redis of REDIS_URL (default redis://127.0.0.1:6379/0), under a
throwaway key prefix deleted afterwards.

With ``--rate`` it is instead one of the publisher processes of bench/streams_fanout.py: it
connects, prints ``READY``, waits for a line on stdin, publishes ``--rate`` events/s for
``--seconds`` over its share of the topics (``--index`` of ``--of`` processes), and prints one
JSON line: events published, the time that took (``--seconds``, or until the last Stream id
came back if later), and how late events were (from the moment each was due to Redis's
acceptance, the Stream id's clock: a publisher that falls behind shows here). ``--cluster``:
``--redis-url`` names a node of a Redis Cluster (no coalescing across calls there: one script
call per slot for each call).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import gc
import json
import math
import os
import secrets
import sys
import time
from collections.abc import Sequence
from typing import Any, Final

import uvloop
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from provisioning import TERMINAL_EVENT_TYPES
from streams import ClusterClient, Event, EventPublisher, PackedConnection, RedisClient
from streams.publisher import DEFAULT_BATCH_ENTRIES

GOAL_EVENTS_PER_SECOND: Final = 50_000
PAD: Final = "x" * 120  # a progress message of realistic length
TICK_SECONDS: Final = 0.002


def percentile(ordered: Sequence[float], q: float) -> float:
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def stream_ms(stream_id: str) -> int:
    """Redis's clock when it accepted the event: the millisecond part of its Stream id."""
    return int(stream_id.partition("-")[0])


def progress_event(n: int) -> Event:
    return Event.create("operation.progress", n=n, progress=50, message=PAD)


def connect(redis_url: str, *, cluster: bool = False) -> RedisClient:
    """A client of the Redis of ``redis_url``: a cluster client when it names a cluster node."""
    if cluster:
        return ClusterClient.from_url(redis_url, max_connections=32)
    # Commands packed by hiredis, as app.application.redis_client's are.
    return Redis.from_url(redis_url, connection_class=PackedConnection)


async def redis_cpu(redis: RedisClient) -> dict[str, float]:
    """CPU seconds each Redis node (each primary of a cluster) has used, from INFO cpu."""
    if isinstance(redis, RedisCluster):
        found = await redis.info("cpu", target_nodes=RedisCluster.PRIMARIES)
    else:
        found = {"redis": await redis.info("cpu")}
    return {
        node: float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        for node, info in found.items()
    }


async def delete_prefix(redis: RedisClient, prefix: str) -> None:
    keys = [k async for k in redis.scan_iter(match=f"{prefix}*", count=1000)]
    for start in range(0, len(keys), 1000):
        await redis.delete(*keys[start : start + 1000])


async def capacity(args: argparse.Namespace) -> dict[str, Any]:
    """``args.publishers`` callers publishing one event after another for ``args.seconds``."""
    prefix = f"bench-{secrets.token_hex(3)}:"
    redis = connect(args.redis_url, cluster=args.cluster)
    publisher = EventPublisher(
        redis,
        prefix=prefix,
        maxlen=100,
        terminal_types=TERMINAL_EVENT_TYPES,
        batch_entries=args.batch_entries,
    )
    latencies = array.array("d")
    stop = False
    # Spread over the topics as a runner's operations are: one topic each, some shared.
    topics = [f"op:bench{i}" for i in range(args.topics)]

    async def caller(index: int) -> None:
        topic, n = topics[index % len(topics)], 0
        while not stop:
            began = time.perf_counter()
            await publisher.publish(progress_event(n), [topic])
            latencies.append(time.perf_counter() - began)
            n += 1

    try:
        await publisher.publish(progress_event(0), ["warm-up"])  # loads the script
        tasks = [asyncio.create_task(caller(i)) for i in range(args.publishers)]
        calls, entries = publisher.stats.calls, publisher.stats.entries
        server_cpu = sum((await redis_cpu(redis)).values())
        began, cpu = time.perf_counter(), time.process_time()
        await asyncio.sleep(args.seconds)
        stop = True
        await asyncio.gather(*tasks)
        elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
        server_cpu = sum((await redis_cpu(redis)).values()) - server_cpu
        calls, entries = publisher.stats.calls - calls, publisher.stats.entries - entries
    finally:
        await delete_prefix(redis, prefix)
        await redis.aclose()
    ordered = sorted(latencies)
    return {
        "publishers": args.publishers,
        "events": len(ordered),
        "seconds": elapsed,
        "events_per_s": len(ordered) / elapsed,
        "script_calls_per_s": calls / elapsed,
        "events_per_call": entries / max(calls, 1),
        "cpu_us_per_event": cpu / max(len(latencies), 1) * 1e6,
        # Redis's own (every primary's, on a cluster): it runs the script, one core at most.
        "redis_cpu_us_per_event": server_cpu / max(len(latencies), 1) * 1e6,
        "p50_ms": percentile(ordered, 0.5) * 1000,
        "p99_ms": percentile(ordered, 0.99) * 1000,
    }


async def at_rate(args: argparse.Namespace) -> dict[str, Any]:
    """Publishes ``args.rate`` events/s over this process's share of the fan-out topics: event
    k is due ``k / rate`` seconds after the start, ``round(seconds * rate)`` in all."""
    redis = connect(args.redis_url, cluster=args.cluster)
    publisher = EventPublisher(
        redis, prefix=args.prefix, maxlen=100, terminal_types=TERMINAL_EVENT_TYPES
    )
    everything = [f"b{i}" for i in range(args.topics)]
    mine = everything[args.index :: args.of] or [everything[args.index % len(everything)]]
    total = round(args.seconds * args.rate)
    lateness = array.array("d")  # ms from an event's due time to Redis's acceptance
    last_reply = 0.0

    async def send(events: list[Event], topics: list[str]) -> None:
        nonlocal last_reply
        answers = await publisher.publish_many(
            [(event, [topic]) for event, topic in zip(events, topics, strict=True)]
        )
        last_reply = time.perf_counter()
        for event, ids in zip(events, answers, strict=True):
            lateness.append(stream_ms(next(iter(ids.values()))) - event.data["t0"] * 1000)

    try:
        await publisher.publish(progress_event(0), ["warm-up"])  # loads the script
        print("READY", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        start, wall, cpu, sent = time.perf_counter(), time.time(), time.process_time(), 0
        async with asyncio.TaskGroup() as tg:
            # Each tick's events in one call, not awaited: a slow call does not hold back the
            # next tick, and calls on their way together are coalesced by the publisher.
            while sent < total:
                due = min(total, int((time.perf_counter() - start) * args.rate) + 1) - sent
                if due > 0:
                    ks = range(sent, sent + due)
                    events = [
                        Event.create(
                            "operation.progress",
                            t0=wall + k / args.rate,
                            n=k,
                            progress=50,
                            message=PAD,
                        )
                        for k in ks
                    ]
                    tg.create_task(send(events, [mine[k % len(mine)] for k in ks]))
                    sent += due
                await asyncio.sleep(TICK_SECONDS)
    finally:
        await redis.aclose()
    ordered = sorted(lateness)
    return {
        "published": len(ordered),
        "seconds": max(args.seconds, last_reply - start),
        "late_p50_ms": percentile(ordered, 0.5),
        "late_p99_ms": percentile(ordered, 0.99),
        "cpu_seconds": time.process_time() - cpu,
    }


def serve_like_the_app() -> None:
    """The collector set as `lookout serve` sets it (app.server): with thousands of tasks
    alive, default thresholds spend a quarter of this process in full collections."""
    gc.set_threshold(50_000, 20, 20)
    gc.collect()
    gc.freeze()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--publishers", type=int, default=2000, help="concurrent callers")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--topics", type=int, default=10_000)
    parser.add_argument("--batch-entries", type=int, default=DEFAULT_BATCH_ENTRIES)
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument(
        "--cluster", action="store_true", help="--redis-url names a Redis Cluster node"
    )
    fanout = parser.add_argument_group("as a publisher process of bench/streams_fanout.py")
    fanout.add_argument("--rate", type=float, help="events/s of this process")
    fanout.add_argument("--prefix", default="bench:")
    fanout.add_argument("--index", type=int, default=0)
    fanout.add_argument("--of", type=int, default=1)
    args = parser.parse_args()
    serve_like_the_app()
    if args.rate is not None:
        print(json.dumps(uvloop.run(at_rate(args))), flush=True)
        return
    r = uvloop.run(capacity(args))
    verdict = "met" if r["events_per_s"] >= GOAL_EVENTS_PER_SECOND else "NOT met"
    print(
        f"publisher capacity, one process, {r['publishers']} concurrent publishers: "
        f"{r['events_per_s']:,.0f} events/s (goal >= {GOAL_EVENTS_PER_SECOND:,}: {verdict})\n"
        f"  {r['script_calls_per_s']:,.0f} script calls/s, {r['events_per_call']:.0f} events "
        f"per call; publish -> Stream id p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms\n"
        f"  this process's CPU: {r['cpu_us_per_event']:.1f} us per event "
        f"(its ceiling on one free core: {1e6 / r['cpu_us_per_event']:,.0f} events/s)\n"
        f"  Redis's CPU: {r['redis_cpu_us_per_event']:.1f} us per event "
        f"(its ceiling on one free core: {1e6 / r['redis_cpu_us_per_event']:,.0f} events/s)"
    )
    print(json.dumps(r))


if __name__ == "__main__":
    main()
