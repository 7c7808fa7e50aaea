"""Fan-out benchmark of the event streams: one server process, load clients in others.

    python bench/streams_fanout.py                       # the default scenarios, ~10 s each
    python bench/streams_fanout.py --scenarios hold-19000 --seconds 5
    python bench/streams_fanout.py --cluster --redis-url redis://10.0.0.5:6379   # a cluster

For each scenario it prints connections, server RSS per connection, deliveries/s, publish ->
receive latency (p50/p99/max) and server CPU (% of one core), then the CPU of each Redis node
(primaries of a cluster) while publishing, from INFO cpu. Loopback only; the Redis of REDIS_URL
(default redis://127.0.0.1:6379/0), under a throwaway key prefix. ``--cluster``: REDIS_URL
names a node of a Redis Cluster (hub designs only; by default the broadcast and per-topic
scenarios): the hub subscribes sharded, one connection per primary, and each primary
announces its own slots' events.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import math
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil
import uvloop
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster

from provisioning import TERMINAL_EVENT_TYPES
from streams import ClusterClient, Event, EventPublisher, RedisClient

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Scenario:
    name: str
    design: str
    connections: int
    topics: int
    events_per_second: float  # published, over all topics


SCENARIOS = {
    s.name: s
    for s in (
        # The hub served by streams.routing.DirectRoutes, as the app should deploy it.
        Scenario("broadcast-200", "hub-direct", 200, 1, 250),  # 50,000 deliveries/s
        Scenario("broadcast-2000", "hub-direct", 2000, 1, 25),  # 50,000 deliveries/s
        Scenario("per-topic-10000", "hub-direct", 10_000, 10_000, 10_000),  # each topic 1/s
        Scenario("hold-5000", "hub-direct", 5000, 1, 1),
        Scenario("hold-19000", "hub-direct", 19_000, 1, 1),
        # For comparison: behind Starlette's routing and middleware; behind sse-starlette; and
        # the per-connection-subscription design (each client its own Redis pub/sub).
        Scenario("routed-broadcast-2000", "hub", 2000, 1, 25),
        Scenario("sse-starlette-broadcast-2000", "hub-sse-starlette", 2000, 1, 25),
        Scenario("baseline-broadcast-2000", "per-connection", 2000, 1, 25),
        Scenario("baseline-per-topic-4000", "per-connection", 4000, 4000, 4000),
    )
}
DEFAULT = (
    "broadcast-200,broadcast-2000,per-topic-10000,routed-broadcast-2000,"
    "sse-starlette-broadcast-2000,baseline-broadcast-2000"
)
CLUSTER_DEFAULT = "broadcast-2000,per-topic-10000"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def percentile(ordered: array.array[float], q: float) -> float:
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def spawn(args: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


def read_line(stream: IO[str] | None, deadline: float) -> str:
    assert stream is not None
    line = stream.readline()
    if not line or time.monotonic() > deadline:
        raise RuntimeError("a benchmark process stopped or hung; see its output above")
    return line.strip()


async def publish_for(
    publisher: EventPublisher, topics: list[str], rate: float, seconds: float
) -> int:
    start, sent = time.perf_counter(), 0
    pad = "x" * 120  # a realistic progress message
    while (elapsed := time.perf_counter() - start) < seconds:
        due = int(elapsed * rate) - sent
        if due > 0:
            calls = []
            for k in range(sent, sent + due):
                event = Event.create(
                    "operation.progress", t0=time.time(), n=k, progress=50, message=pad
                )
                calls.append(publisher.publish(event, [topics[k % len(topics)]]))
            await asyncio.gather(*calls)
            sent += due
        await asyncio.sleep(0.002)
    return sent


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


def run_scenario(
    scenario: Scenario,
    seconds: float,
    redis_url: str,
    per_process: int = 5000,
    *,
    cluster: bool = False,
) -> dict[str, Any]:
    prefix = f"bench-{secrets.token_hex(3)}:"
    port = free_port()
    server = spawn(
        [
            os.environ.get("BENCH_SERVER") or str(HERE / "streams_server.py"),
            "--port",
            str(port),
            "--design",
            scenario.design,
            "--redis-url",
            redis_url,
            "--prefix",
            prefix,
            *(["--cluster"] if cluster else []),
        ]
    )
    clients: list[subprocess.Popen[str]] = []
    files: list[str] = []
    try:
        if read_line(server.stdout, time.monotonic() + 30) != "READY":
            raise RuntimeError("the server did not start")
        proc = psutil.Process(server.pid)
        time.sleep(0.5)
        rss_before = proc.memory_info().rss
        processes = max(1, math.ceil(scenario.connections / per_process))
        per = math.ceil(scenario.connections / processes)
        for i in range(processes):
            count = min(per, scenario.connections - i * per)
            out = os.path.join(tempfile.gettempdir(), f"lookout-bench-{prefix[6:-1]}-{i}.lat")
            files.append(out)
            clients.append(
                spawn(
                    [
                        str(HERE / "streams_clients.py"),
                        "--port",
                        str(port),
                        "--connections",
                        str(count),
                        "--topics",
                        str(scenario.topics),
                        "--offset",
                        str(i * per),
                        "--out",
                        out,
                    ]
                )
            )
        connected = failed = 0
        for client in clients:
            _, ok, bad = read_line(client.stdout, time.monotonic() + 300).split()
            connected, failed = connected + int(ok), failed + int(bad)
        time.sleep(2)  # every subscription confirmed
        rss_after = proc.memory_info().rss
        cpu_before, wall_before = proc.cpu_times(), time.monotonic()
        topics = [f"b{i}" for i in range(scenario.topics)]

        redis_cpu_pct: dict[str, float] = {}

        async def publish() -> int:
            redis: RedisClient
            if cluster:
                redis = ClusterClient.from_url(redis_url, max_connections=32)
            else:
                pool = BlockingConnectionPool.from_url(redis_url, max_connections=32)
                redis = Redis(connection_pool=pool)
            try:
                before, started = await redis_cpu(redis), time.monotonic()
                sent = await publish_for(
                    EventPublisher(
                        redis, prefix=prefix, maxlen=100, terminal_types=TERMINAL_EVENT_TYPES
                    ),
                    topics,
                    scenario.events_per_second,
                    seconds,
                )
                after, wall = await redis_cpu(redis), time.monotonic() - started
                for node, used in after.items():
                    redis_cpu_pct[node] = 100 * (used - before.get(node, used)) / wall
                return sent
            finally:
                keys = [k async for k in redis.scan_iter(match=f"{prefix}*", count=1000)]
                for start in range(0, len(keys), 1000):
                    await redis.delete(*keys[start : start + 1000])
                await redis.aclose()

        published = uvloop.run(publish())
        time.sleep(1)  # drain
        cpu_after, wall_after = proc.cpu_times(), time.monotonic()
        events, closed = 0, 0
        for client in clients:
            assert client.stdin is not None
            client.stdin.write("STOP\n")
            client.stdin.flush()
        for client in clients:
            summary = json.loads(read_line(client.stdout, time.monotonic() + 60))
            events += summary["events"]
            closed += summary["closed"]
        latencies = array.array("d")
        for name in files:
            with open(name, "rb") as handle:
                latencies.frombytes(handle.read())
        ordered = array.array("d", sorted(latencies))
        busy = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
        return {
            "scenario": scenario.name,
            "design": scenario.design,
            "connections": connected,
            "failed": failed,
            "cut_off": closed,
            "published": published,
            "expected": published * scenario.connections // scenario.topics,
            "deliveries": events,
            "deliveries_per_s": events / seconds,
            "rss_per_conn_kb": (rss_after - rss_before) / max(connected, 1) / 1024,
            "rss_mb": rss_after / 2**20,
            "p50_ms": percentile(ordered, 0.50) * 1000,
            "p99_ms": percentile(ordered, 0.99) * 1000,
            "max_ms": (ordered[-1] if ordered else math.nan) * 1000,
            "server_cpu_pct": 100 * busy / (wall_after - wall_before),
            "server_sys_pct": 100
            * (cpu_after.system - cpu_before.system)
            / (wall_after - wall_before),
            "redis_cpu_pct": redis_cpu_pct,
        }
    finally:
        for client in clients:
            client.kill()
            client.wait()
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        for name in files:
            Path(name).unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scenarios", default=DEFAULT, help=f"comma-separated, of: {', '.join(SCENARIOS)}"
    )
    parser.add_argument(
        "--per-process", type=int, default=5000, help="connections per load-client process"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="publishing time per scenario")
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help=f"--redis-url names a Redis Cluster node (default scenarios: {CLUSTER_DEFAULT})",
    )
    args = parser.parse_args()
    scenarios = args.scenarios
    if args.cluster and scenarios == DEFAULT:
        scenarios = CLUSTER_DEFAULT
    header = (
        f"{'scenario':30} {'conns':>6} {'KB/conn':>8} {'deliv/s':>9} {'got/expected':>17} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'CPU %':>6} {'(sys)':>6}"
    )
    print(header, flush=True)
    results = []
    for name in scenarios.split(","):
        r = run_scenario(
            SCENARIOS[name.strip()],
            args.seconds,
            args.redis_url,
            args.per_process,
            cluster=args.cluster,
        )
        results.append(r)
        print(
            f"{r['scenario']:30} {r['connections']:>6} {r['rss_per_conn_kb']:>8.1f} "
            f"{r['deliveries_per_s']:>9.0f} {r['deliveries']:>8}/{r['expected']:<8} "
            f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['max_ms']:>8.1f} "
            f"{r['server_cpu_pct']:>6.0f} {r['server_sys_pct']:>6.0f}",
            flush=True,
        )
        nodes = ", ".join(f"{n} {pct:.0f}" for n, pct in sorted(r["redis_cpu_pct"].items()))
        print(f"{'':30} Redis CPU % while publishing: {nodes}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
