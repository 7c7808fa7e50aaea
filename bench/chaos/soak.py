"""One soak, start to end: servers, proxies, instances, traffic and faults; then the settle
time, the invariants and the report. Everything started here is stopped here, whatever happens."""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import asyncpg
from redis.asyncio import Redis

from app.users import create_api_key, create_user
from bench.chaos.cluster import (
    Instance,
    RedisServer,
    create_database,
    drop_database,
    free_port,
    lookout_environment,
    postgres_admin_url,
    start_emulator,
    stop_process,
    wait_http,
    wait_ready,
    with_database,
)
from bench.chaos.invariants import Invariant, World, check_all, faults_injected
from bench.chaos.proxy import FaultProxy, LoadBalancer, fault_proxy, url_through
from bench.chaos.report import print_report
from bench.chaos.schedule import KINDS, Faults, HealthWatch
from bench.chaos.traffic import Traffic
from bench.chaos.webhooks import WebhookSender
from provisioning import GraphBackend, SharedRepositoryBackend
from streams.topics import operation_topic, stream_key

__all__ = ["SoakOptions", "soak"]


@dataclass(frozen=True)
class SoakOptions:
    minutes: float
    instances: int = 2
    seed: int = 1
    customers: int = 6
    settle_seconds: float = 150.0
    keep: bool = False  # keep the run's directory (logs, Redis data) and its database
    kinds: tuple[str, ...] = KINDS  # the faults to inject; none: a control run


async def _teardown_resources(database_url: str, admin_url: str) -> None:
    """Removes every database and role the run's subscriptions made on the shared server."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT resource_id, resource_type FROM subscriptions")
    finally:
        await conn.close()
    graphs, repositories = GraphBackend(admin_url), SharedRepositoryBackend(admin_url)
    for row in rows:
        backend = graphs if row["resource_type"] == "graph" else repositories
        with contextlib.suppress(Exception):
            await backend.teardown(row["resource_id"])


async def _settle(
    database_url: str, sender: WebhookSender, traffic: Traffic, within: float
) -> float:
    """Waits until nothing is left to do (or `within` seconds); answers how long it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while loop.time() - start < within:
        # Only the server being away or full is waited out (the machine's server is shared:
        # others' tests once took its last connection): a query error (a table renamed under
        # the soak) once made every settle last its whole bound.
        with contextlib.suppress(
            OSError,
            asyncpg.PostgresConnectionError,
            asyncpg.CannotConnectNowError,
            asyncpg.TooManyConnectionsError,
        ):
            conn = await asyncpg.connect(database_url)
            try:
                busy = await conn.fetchval(
                    "SELECT (SELECT count(*) FROM operations"
                    "        WHERE status NOT IN ('completed', 'failed', 'cancelled'))"
                    " + (SELECT count(*) FROM webhook_events WHERE status <> 'processed')"
                    " + (SELECT count(*) FROM subscriptions WHERE status = 'provisioning')"
                    " + (SELECT count(*) FROM stripe_compensations WHERE done_at IS NULL)"
                )
            finally:
                await conn.close()
            watching = sum(1 for c in traffic.customers for op in c.operations if not op.finished)
            if busy == 0 and sender.outstanding == 0 and watching == 0:
                break
        await asyncio.sleep(1.0)
    return loop.time() - start


async def _resumption_after_kills(
    redis: Redis, prefix: str, faults: Faults
) -> tuple[list[float], int]:
    """For each operation pending or running when an instance was SIGKILLed: seconds from the
    kill to its next event in its Stream (the work moving again, on whichever instance). The
    slowest of a kill approximates the takeover time; an operation that published nothing
    more is counted apart (it may have been waiting out another fault)."""
    resumed: list[float] = []
    stuck = 0
    for record in faults.records:
        if record.kind != "instance SIGKILL":
            continue
        for op_id in record.in_flight:
            entries: Any = await redis.xrange(
                stream_key(prefix, operation_topic(op_id)), min=f"{record.wall_ms + 1}", count=1
            )
            if entries:
                entry_id = entries[0][0]
                text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                resumed.append((int(text.split("-")[0]) - record.wall_ms) / 1000)
            else:
                stuck += 1
    return resumed, stuck


async def soak(options: SoakOptions, out: TextIO) -> bool:
    rng = random.Random(options.seed)
    run_dir = Path(tempfile.mkdtemp(prefix="lookout-chaos-"))
    started = time.monotonic()
    processes: list[subprocess.Popen[bytes]] = []
    instances: list[Instance] = []
    redis_server = RedisServer(free_port(), run_dir / "redis")
    out.write(f"chaos soak: seed {options.seed}, {options.minutes} min, "
              f"{options.instances} instances, logs in {run_dir}\n")  # fmt: skip
    out.flush()
    with postgres_admin_url() as admin_url:
        database = await create_database(admin_url)
        database_url = with_database(admin_url, database)
        try:
            redis_server.start()
            stripe_key = f"sk_test_chaos_{secrets.token_hex(8)}"
            webhook_secret = f"whsec_{secrets.token_hex(16)}"
            emulator_port = free_port()
            emulator_url = f"http://127.0.0.1:{emulator_port}"
            processes.append(
                start_emulator(emulator_port, stripe_key, webhook_secret, run_dir / "emulator.log")
            )
            await wait_http(f"{emulator_url}/_emulator/webhooks", within=30)
            async with (
                fault_proxy("postgres", admin_url) as pg_proxy,
                fault_proxy("redis", redis_server.url) as redis_proxy,
                fault_proxy("provisioner", admin_url) as provisioner_proxy,
                fault_proxy("stripe", emulator_url) as stripe_proxy,
            ):
                ports = [free_port() for _ in range(options.instances)]
                lb = LoadBalancer(free_port(), ports, random.Random(rng.random()))
                await lb.accept()
                lb_url = f"http://127.0.0.1:{lb.port}"
                prefix = f"chaos{secrets.token_hex(4)}:"
                env = lookout_environment(
                    DATABASE_URL=url_through(database_url, pg_proxy.port),
                    REDIS_URL=url_through(redis_server.url, redis_proxy.port),
                    PROVISIONER_DATABASE_URL=url_through(admin_url, provisioner_proxy.port),
                    STRIPE_API_BASE=f"http://127.0.0.1:{stripe_proxy.port}",
                    STRIPE_API_KEY=stripe_key,
                    STRIPE_WEBHOOK_SECRET=webhook_secret,
                    LOOKOUT_SECRET_KEY=secrets.token_urlsafe(32),
                    LOOKOUT_PUBLIC_URL=lb_url,
                    LOOKOUT_REDIS_PREFIX=prefix,
                    LOOKOUT_ENVIRONMENT="chaos",
                    LOOKOUT_DATA_DIR=str(run_dir / "data"),
                    LOOKOUT_PROVISIONER_RETRY_SECONDS="300",
                )
                for i, port in enumerate(ports):
                    instances.append(
                        Instance(f"lookout-{i + 1}", port, env, run_dir / f"lookout-{i + 1}.log")
                    )
                try:
                    passed = await _run(
                        options, rng, out, started, instances, redis_server, lb, lb_url,
                        pg_proxy, redis_proxy, provisioner_proxy, stripe_proxy,
                        admin_url, database, database_url, emulator_url, stripe_key,
                        webhook_secret, prefix,
                    )  # fmt: skip
                finally:
                    for instance in instances:
                        instance.stop()
                    await lb.close()
        finally:
            for process in processes:
                stop_process(process)
            redis_server.stop()
            if options.keep:
                out.write(
                    f"kept: {run_dir} (logs, Redis data) and the database {database}; drop it"
                    " and the lookout_gr_*/lookout_repo_* it names when done\n"
                )
            else:
                with contextlib.suppress(Exception):
                    await _teardown_resources(database_url, admin_url)
                with contextlib.suppress(Exception):
                    await drop_database(admin_url, database)
                shutil.rmtree(run_dir, ignore_errors=True)
    return passed


async def _run(
    options: SoakOptions,
    rng: random.Random,
    out: TextIO,
    started: float,
    instances: list[Instance],
    redis_server: RedisServer,
    lb: LoadBalancer,
    lb_url: str,
    pg_proxy: FaultProxy,
    redis_proxy: FaultProxy,
    provisioner_proxy: FaultProxy,
    stripe_proxy: FaultProxy,
    admin_url: str,
    database: str,
    database_url: str,
    emulator_url: str,
    stripe_key: str,
    webhook_secret: str,
    prefix: str,
) -> bool:
    timings: dict[str, float] = {}
    instances[0].start()  # the first one migrates the database alone
    assert instances[0].process is not None
    await wait_ready(instances[0].url, within=60, process=instances[0].process)
    for instance in instances[1:]:
        instance.start()
    for instance in instances[1:]:
        assert instance.process is not None
        await wait_ready(instance.url, within=60, process=instance.process)
    timings["start-up"] = time.monotonic() - started

    conn = await asyncpg.connect(database_url)
    try:
        probe = await create_user(conn, f"probe-{secrets.token_hex(4)}@example.com")
        probe_key = await create_api_key(conn, probe.id)
    finally:
        await conn.close()
    traffic = Traffic(lb_url, emulator_url, database_url, random.Random(rng.random()))
    await traffic.add_customers(options.customers)
    sender = WebhookSender(
        emulator_url, f"{lb_url}/v1/webhooks/stripe", webhook_secret, random.Random(rng.random())
    )
    faults = Faults(
        random.Random(rng.random()), instances, redis_server, pg_proxy, redis_proxy,
        provisioner_proxy, stripe_proxy, admin_url, database, emulator_url, options.kinds,
    )  # fmt: skip
    watch = HealthWatch(instances, lb_url, probe_key, faults)

    background = [
        asyncio.ensure_future(sender.run()),
        asyncio.ensure_future(traffic.run()),
        asyncio.ensure_future(watch.run()),
    ]
    redis = Redis(port=redis_server.port, socket_timeout=10)
    try:
        window = options.minutes * 60
        soak_start = time.monotonic()
        await faults.run(window)
        remaining = window - (time.monotonic() - soak_start)
        if remaining > 0:
            await asyncio.sleep(remaining)
        traffic.stop()
        timings["traffic and faults"] = time.monotonic() - soak_start
        out.write(
            f"faults and traffic over after {timings['traffic and faults']:.0f} s; settling\n"
        )
        out.flush()
        await background[1]
        timings["settle"] = await _settle(database_url, sender, traffic, options.settle_seconds)
        # The dashboards resume once more and must reach each Stream's last entry.
        traffic.stop_streams()
        await traffic.wait_streams()
        caught_up: dict[int, bool] = {}

        async def catch_up(client_key: int, client: object) -> None:
            from bench.chaos.sse import SseClient

            assert isinstance(client, SseClient)
            entries: Any = await redis.xrevrange(stream_key(prefix, client.topic), count=1)
            last = entries[0][0].decode() if entries else None
            caught_up[client_key] = await client.catch_up(last, within=20)

        await asyncio.gather(*(catch_up(id(c.events), c.events) for c in traffic.customers))
        sender.stop()
        watch.stop()
        await asyncio.gather(*background, return_exceptions=True)
        check_start = time.monotonic()
        world = World(
            database_url=database_url,
            admin_url=admin_url,
            emulator_url=emulator_url,
            stripe_key=stripe_key,
            lb_url=lb_url,
            redis=redis,
            redis_prefix=prefix,
            customers=traffic.customers,
            deliveries=list(sender.deliveries.values()),
            instances=instances,
            caught_up=caught_up,
            unexpected_exits=watch.unexpected_exits,
            server_errors=traffic.server_errors,
        )
        results: list[Invariant] = [
            faults_injected(options.kinds, faults.records),
            *await check_all(world),
        ]
        resumed, stuck = await _resumption_after_kills(redis, prefix, faults)
        timings["checks"] = time.monotonic() - check_start
        timings["whole run"] = time.monotonic() - started
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        traffic.stop()
        traffic.stop_streams()
        await redis.aclose()

    deliveries = list(sender.deliveries.values())
    statuses: dict[str, int] = {}
    for d in deliveries:
        for a in d.attempts:
            if not (isinstance(a, int) and 200 <= a < 300):
                statuses[str(a)] = statuses.get(str(a), 0) + 1
    clients = [c for cust in traffic.customers for c in (cust.events, *cust.operations)]
    conn = await asyncpg.connect(database_url)
    try:
        ops = await conn.fetch("SELECT status, count(*) AS n FROM operations GROUP BY 1")
        subs = await conn.fetch("SELECT status, count(*) AS n FROM subscriptions GROUP BY 1")
        why = await conn.fetch(
            "SELECT left(coalesce(error, '?'), 60) AS error, count(*) AS n FROM operations"
            " WHERE status = 'failed' GROUP BY 1 ORDER BY 2 DESC"
        )
    finally:
        await conn.close()
    handled: dict[str, int | str] = {
        "customers": len(traffic.customers),
        "Stripe events sent as webhooks": len(deliveries),
        "webhook deliveries (all attempts)": sum(len(d.attempts) for d in deliveries),
        "  duplicated on purpose": sum(d.duplicated for d in deliveries),
        "  held back to arrive out of order": sum(d.reordered for d in deliveries),
        "  delayed by seconds": sum(d.delayed for d in deliveries),
        "  answered non-2xx or not at all (retried)": sum(statuses.values()),
        "operations": sum(r["n"] for r in ops),
        **{f"  {r['status']}": r["n"] for r in ops},
        **{f"    failed: {r['error']}": r["n"] for r in why},
        "subscriptions": sum(r["n"] for r in subs),
        **{f"  subscription {r['status']}": r["n"] for r in subs},
        "SSE clients": len(clients),
        "stream events received": sum(len(c.log) for c in clients),
        "SSE connections (reconnects)": f"{sum(c.connections for c in clients)}"
        f" ({sum(c.reconnects for c in clients)})",
        "load balancer connections": lb.connections,
        "health samples": watch.samples,
        **{f"traffic: {k}": v for k, v in sorted(traffic.counts.items())},
    }
    for what, n in sorted(statuses.items()):
        handled[f"  webhook answer {what}"] = n
    print_report(
        out,
        resumed=resumed,
        never_resumed=stuck,
        header=f"Chaos soak: seed {options.seed}, {options.minutes} min, "
        f"{options.instances} instances, {options.customers} customers",
        faults=faults.records,
        handled=handled,
        invariants=results,
        timings=timings,
        started=started,
    )
    return all(inv.ok for inv in results)
