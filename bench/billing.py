"""Webhook acknowledgement latency, and from payment confirmation to provisioning, measured.

    python -m bench.billing [--rate 200] [--seconds 10] [--provisionings 100] [--workers 1]
                            [--warm-pool N]
                            [--profile FILE] [--server-log FILE]

Lookout runs as `lookout serve` in its own process (on DATABASE_URL / REDIS_URL, or embedded
servers), the Stripe emulator and this load client in this one. The client sends signed
webhooks at a steady rate: `--provisionings` of them confirm a payment (each starts a real
graph provisioning), the rest are other events Lookout stores and audits. 100 provisionings
started together: `--rate 1000 --seconds 0.1`. It prints: acknowledgement latency; from the
confirmation's arrival (its inbox row's `received_at`) and from its acknowledgement to
`operation.started` on the stream (the Stream id's clock); from its arrival to
`operation.completed`; `operation.started` → terminal event; operations per second. Beside
them, what the server saw over the run (`bench.server_metrics`: its histograms of
acknowledgement, received → `operation.started` published, and event-loop lag, scraped from
/metrics before and after): a tail on the client's side only was spent outside the server's
routes (waiting to be read, or in the load client). `--workers N` serves with
`lookout serve --workers N`.
`--warm-pool N` sets `LOOKOUT_WARM_POOL_SIZE` of the server (default: Lookout's own, 4); the
burst starts once the pool is full, and the same figures are printed apart for the provisions
that took a pooled database ("while the pool lasts") and for those that created theirs.
The CPU the server and PostgreSQL used per operation, and how busy the machine was, are
printed too (`bench.cpu`): on a shared machine they tell a slow run from a costly one.
`--profile FILE` records the server with py-spy (installed separately) for 15 s from the
first webhook, as collapsed stacks. `--server-log FILE` runs the server at debug level into FILE:
the event-loop stalls over 50 ms are logged there with the stack that blocked the loop
(app.loop_lag); debug logging costs the server some CPU of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
from redis.asyncio import Redis

from app.application import PROVISIONING_CONCURRENCY
from app.cli.embedded import embedded_servers
from app.demo.stripe_emulator import create_emulator
from app.settings import Settings
from app.users import create_api_key, create_user
from bench.cpu import CpuSample
from bench.raw_http import RawConnection, build_post
from bench.server_metrics import report, scrape
from provisioning import HEAVY_AT_ONCE, GraphBackend
from provisioning.warm_pool import template_name
from streams import operation_topic, stream_key
from tests.support import database_dsn, free_port, live_server
from tests.support.process import serve_process
from tests.support.stripe_events import make_event, signature, stripe_object


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _stream_ms(entry_id: object) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return int(text.split("-")[0])


def line(name: str, values_ms: list[float]) -> str:
    return (
        f"{name:<42} n={len(values_ms):<5} p50={percentile(values_ms, 0.5):8.2f} ms"
        f"  p99={percentile(values_ms, 0.99):8.2f} ms  max={max(values_ms, default=0):8.2f} ms"
    )


async def prepare_payments(
    http: httpx.AsyncClient, control: httpx.AsyncClient, db: asyncpg.Connection, count: int
) -> list[dict[str, Any]]:
    """`count` paid checkouts whose completion events have not been delivered yet."""
    events = []
    for number in range(count):
        user = await create_user(db, f"bench-{number}-{secrets.token_hex(3)}@example.com")
        key = await create_api_key(db, user.id)
        started = (
            await http.post(
                "/v1/checkout",
                json={"plan": "graph-standard", "resource_name": f"bench-{number}"},
                headers={"Authorization": f"Bearer {key}"},
            )
        ).json()
        paid = (
            await control.post(
                f"/_emulator/checkout/{started['checkout_session_id']}/pay",
                json={"deliver_webhooks": False},
            )
        ).json()
        completed = next(e for e in paid["events"] if e["type"] == "checkout.session.completed")
        event = (await control.get(f"/_emulator/events/{completed['id']}")).json()["event"]
        events.append({"event": event, "subscription_id": started["subscription_id"]})
    return events


async def run(args: argparse.Namespace, settings: Settings) -> None:
    port, emulator_port = free_port(), free_port()
    url, emulator_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{emulator_port}"
    secret = f"whsec_{secrets.token_hex(8)}"
    settings = replace(settings, stripe_api_base=emulator_url, stripe_webhook_secrets=(secret,))
    emulator = create_emulator(
        webhook_url=None,
        webhook_secret=secret,
        public_url=emulator_url,
        api_key=settings.stripe_api_key,
    )
    assert settings.database_url is not None
    db = await asyncpg.connect(settings.database_url)
    async with (
        live_server(emulator, port=emulator_port),
        serve_process(
            settings,
            port=port,
            workers=args.workers,
            debug_log=None if args.server_log is None else Path(args.server_log),
        ) as server,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
        httpx.AsyncClient(base_url=emulator_url, timeout=30) as control,
    ):
        payments = await prepare_payments(http, control, db, args.provisionings)
        await wait_for_warm_pool(db, settings.warm_pool_size)
        total = int(args.rate * args.seconds)
        every = max(1, total // max(1, len(payments)))
        plan: list[dict[str, Any]] = []
        for index in range(total):
            if index % every == 0 and payments:
                plan.append(payments.pop())
            else:
                plan.append({"event": make_event("invoice.created", stripe_object("invoice"))})
        acks: list[float] = []
        ack_at: dict[str, float] = {}
        last_ack = 0.0
        event_of = {
            item["subscription_id"]: item["event"]["id"]
            for item in plan
            if "subscription_id" in item
        }
        failures = 0
        host, port_text = url.removeprefix("http://").split(":")
        # One connection per request in flight, opened before the burst, as a steady sender's
        # would be; each request is built and signed beforehand.
        connections = [
            await RawConnection.open(host, int(port_text)) for _ in range(min(len(plan), 100))
        ]
        requests = [_signed_request(url, item["event"], secret) for item in plan]
        profiler = _start_profiler(args.profile, server.process.pid)
        server_before = await scrape(url, workers=args.workers)
        # A second at rest first: what PostgreSQL and the machine spend without this run (other
        # users of a shared machine), to read the run's figures against.
        rest = CpuSample.take(server.process.pid)
        await anyio.sleep(1.0)
        rest = CpuSample.take(server.process.pid) - rest
        cpu_before = CpuSample.take(server.process.pid)
        begin = time.perf_counter()

        async def send(index: int, item: dict[str, Any]) -> None:
            nonlocal failures, last_ack
            sent = time.perf_counter()
            status, _ = await connections[index % len(connections)].send(requests[index])
            done = time.perf_counter()
            last_ack = max(last_ack, done)
            if status != 200:
                failures += 1
            acks.append((done - sent) * 1000)
            if "subscription_id" in item:
                ack_at[item["subscription_id"]] = time.time()

        async with anyio.create_task_group() as tg:
            for index, item in enumerate(plan):
                # A steady rate, as Stripe sends: wait for each request's turn.
                due = begin + index / args.rate
                await anyio.sleep(max(0.0, due - time.perf_counter()))
                tg.start_soon(send, index, item)
        sent_for = time.perf_counter() - begin
        for connection in connections:
            await connection.close()

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            pending = await db.fetchval(
                "SELECT count(*) FROM operations WHERE status NOT IN ('completed','failed')"
            )
            started = await db.fetchval("SELECT count(*) FROM operations")
            if pending == 0 and started >= len(ack_at):
                break
            # Often: the CPU figures end here, and the pool's refill starts as soon as the
            # last operation has finished.
            await asyncio.sleep(0.05)
        cpu_used = CpuSample.take(server.process.pid) - cpu_before
        server_after = await scrape(url, workers=args.workers)
        if profiler is not None:
            profiler.wait()
            print(f"profile of the server during the burst: {args.profile}")
        rows = await db.fetch(
            "SELECT id, subject_id, resource_id, finished_at, created_at, status FROM operations"
        )
        pooled = {
            r["claimed_by"]
            for r in await db.fetch("SELECT claimed_by FROM warm_pool WHERE state = 'claimed'")
        }
        redis = Redis.from_url(settings.redis_url or "")
        received = {
            r["id"]: r["received_at"].timestamp()
            for r in await db.fetch("SELECT id, received_at FROM webhook_events")
        }
        received_at = {sub: received[event] for sub, event in event_of.items() if event in received}
        from_received: list[float] = []
        to_started: list[float] = []
        to_created: list[float] = []
        to_completed: list[float] = []
        completed_by_source: dict[bool, list[float]] = {True: [], False: []}
        durations: list[float] = []
        for row in rows:
            acked = ack_at.get(row["subject_id"])
            if acked is None:
                continue
            to_created.append((row["created_at"].timestamp() - acked) * 1000)
            # A Stream id starts with the Redis server's clock in ms: when it was published.
            key = stream_key(settings.redis_prefix, operation_topic(row["id"]))
            first, last = await redis.xrange(key, count=1), await redis.xrevrange(key, count=1)
            if first and last:
                started_ms = _stream_ms(first[0][0])
                to_started.append(started_ms - acked * 1000)
                if row["subject_id"] in received_at:
                    received_ms = received_at[row["subject_id"]] * 1000
                    from_received.append(started_ms - received_ms)
                    if row["status"] == "completed":
                        to_completed.append(_stream_ms(last[0][0]) - received_ms)
                        completed_by_source[row["resource_id"] in pooled].append(to_completed[-1])
                durations.append(float(_stream_ms(last[0][0]) - started_ms))
        await redis.aclose()
        finished = [r["finished_at"] for r in rows if r["finished_at"] is not None]
        first = min((r["created_at"] for r in rows), default=None)
        span = (max(finished) - first).total_seconds() if finished and first else float("nan")
        print(
            f"webhooks sent: {len(acks)} in {sent_for:.1f} s"
            f" ({len(acks) / sent_for:.0f}/s), non-200: {failures}; acknowledged by"
            f" {last_ack - begin:.1f} s ({len(acks) / (last_ack - begin):.0f}/s: past what the"
            " server takes, this is its capacity)"
        )
        print(line("webhook acknowledgement", acks))
        print(line("ack -> operation row (provisioning start)", to_created))
        print(line("received -> operation.started on the stream", from_received))
        print(line("ack -> operation.started on the stream", to_started))
        print(line("received -> operation.completed", to_completed))
        print(line("  of those, from the warm pool", completed_by_source[True]))
        print(line("  of those, databases created", completed_by_source[False]))
        print(line("operation.started -> terminal event", durations))
        for text in report(server_before, server_after):
            print(text)
        statuses = {
            s: sum(1 for r in rows if r["status"] == s) for s in {r["status"] for r in rows}
        }
        print(
            f"operations: {statuses}; {len(finished) / span:.1f} operations/s over {span:.1f} s"
            f" (per instance: {PROVISIONING_CONCURRENCY} operations at once, of which"
            f" {HEAVY_AT_ONCE} may run CREATE or DROP DATABASE)"
        )
        print(cpu_used.describe(operations=len(rows)))
        # Only for webhooks alone (a provision's CPU is not a request's), sent faster than the
        # server takes them (the sending took longer than planned): at a lower rate the fixed
        # costs of the sweeps and the pool would count as the requests'.
        if not rows and sent_for > 1.1 * args.seconds:
            print(f"  {cpu_used.ceilings(requests=len(acks), workers=args.workers)}")
        print(f"  at rest, the second before: {rest.at_rest()}")
        took = [r for r in rows if r["resource_id"] in pooled and r["finished_at"] is not None]
        if took:
            pool_span = (
                max(r["finished_at"] for r in took) - min(r["created_at"] for r in took)
            ).total_seconds()
            print(
                f"while the warm pool lasted: {len(took)} of {len(rows)} provisions took a pooled"
                f" database, {len(took) / pool_span:.1f} operations/s over {pool_span:.2f} s"
                f" (pool size {settings.warm_pool_size})"
            )
        else:
            print(f"no provision took a pooled database (pool size {settings.warm_pool_size})")
    await db.close()


async def wait_for_warm_pool(db: asyncpg.Connection, size: int) -> None:
    """The burst starts with a full pool: the server fills it from its start."""
    began = time.monotonic()
    ready = 0
    while time.monotonic() - began < 300:
        ready = await db.fetchval("SELECT count(*) FROM warm_pool WHERE state = 'ready'")
        if ready >= size:
            break
        await asyncio.sleep(0.2)
    print(f"warm pool: {ready} of {size} databases ready ({time.monotonic() - began:.1f} s wait)")


def _signed_request(url: str, event: dict[str, Any], secret: str) -> bytes:
    body = json.dumps(event)
    headers = {"Stripe-Signature": signature(body, secret), "Content-Type": "application/json"}
    return build_post(url.removeprefix("http://"), "/v1/webhooks/stripe", body.encode(), headers)


def _start_profiler(path: str | None, pid: int) -> subprocess.Popen[bytes] | None:
    """py-spy on the server for the burst and the provisioning that follows it."""
    if path is None:
        return None
    command = ["py-spy", "record", "-p", str(pid), "-d", "15", "-r", "500", "-f", "raw"]
    profiler = subprocess.Popen([*command, "--nonblocking", "-o", path])
    time.sleep(1)  # py-spy attaches before the first webhook is sent
    return profiler


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--provisionings", type=int, default=100)
    parser.add_argument(
        "--workers", type=int, default=1, help="lookout serve --workers N (default: 1)"
    )
    parser.add_argument(
        "--warm-pool",
        type=int,
        metavar="N",
        help="graph databases the server keeps made ahead of demand (LOOKOUT_WARM_POOL_SIZE)",
    )
    parser.add_argument(
        "--profile", metavar="FILE", help="record the server with py-spy (collapsed stacks)"
    )
    parser.add_argument(
        "--server-log",
        metavar="FILE",
        help="the server logs at debug level into FILE (event-loop stall stacks among it)",
    )
    args = parser.parse_args()
    data_dir = Path(os.environ.get("LOOKOUT_DATA_DIR", ".lookout")) / "bench"
    with embedded_servers(
        data_dir,
        database_url=os.environ.get("DATABASE_URL") or None,
        redis_url=os.environ.get("REDIS_URL") or None,
    ) as servers:
        database = f"lookout_bench_{secrets.token_hex(4)}"
        asyncio.run(_admin(servers.database_url, f'CREATE DATABASE "{database}"'))
        settings = Settings.from_env(
            {
                "DATABASE_URL": database_dsn(servers.database_url, database),
                "REDIS_URL": servers.redis_url,
                "PROVISIONER_DATABASE_URL": servers.database_url,
                "LOOKOUT_SECRET_KEY": secrets.token_urlsafe(32),
                "STRIPE_API_KEY": "sk_test_bench",
                "STRIPE_WEBHOOK_SECRET": "whsec_bench",
                "LOOKOUT_REDIS_PREFIX": f"bench-{secrets.token_hex(3)}:",
            }
            | ({} if args.warm_pool is None else {"LOOKOUT_WARM_POOL_SIZE": str(args.warm_pool)})
        )
        try:
            anyio.run(run, args, settings)
        finally:
            asyncio.run(_clean_up(servers.database_url, database))


async def _admin(admin_dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def _clean_up(admin_dsn: str, database: str) -> None:
    """Drops the bench's database, every graph it provisioned (roles included), what is left
    of the server's warm pool and its template."""
    conn = await asyncpg.connect(database_dsn(admin_dsn, database))
    try:
        graphs = [
            r["resource_id"] for r in await conn.fetch("SELECT resource_id FROM subscriptions")
        ]
        graphs += [r["id"] for r in await conn.fetch("SELECT id FROM warm_pool")]
    finally:
        await conn.close()
    backend = GraphBackend(admin_dsn)
    for graph in graphs:
        await backend.teardown(graph)
    await _admin(
        admin_dsn, f'DROP DATABASE IF EXISTS "{template_name(backend.name_prefix)}" WITH (FORCE)'
    )
    await _admin(admin_dsn, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


if __name__ == "__main__":
    main()
