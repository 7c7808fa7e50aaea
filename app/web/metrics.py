"""`GET /metrics`: what a person operating Lookout looks at, in Prometheus' text format.

Counters that change on a hot path live in memory (events published, task restarts), and so
do the latency histograms (webhook acknowledgement, payment received to `operation.started`,
event-loop lag: observed where they happen, never read from the database);
everything that is state (inbox depth and age, operations by status and duration) is read from
PostgreSQL, so every instance reports the same truth and nothing drifts. Those reads count
whole tables, so they run at most once per ``state_ttl`` seconds whatever the scrape rate
(concurrent scrapes share one read), under a statement timeout; a scrape while PostgreSQL is
away answers the last figures read. Each app has its own registry: no module-level state.

Every figure is this process's: under `lookout serve --workers N` each worker answers its own
/metrics (a scrape reaches whichever worker accepts it), and `lookout_process_info` says which
(`pid`, `worker`). The stored figures are the same from every worker.

To add a figure: a field on ``LiveFigures`` (in process) or ``StoredFigures`` (read from
PostgreSQL, in ``_read_stored``), and its family in ``_StateCollector.collect``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import anyio
import asyncpg
from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.billing.webhooks.inbox import InboxCounts, inbox_counts
from app.db import Connection
from provisioning import (
    DATABASE_ERRORS,
    PlacedGraphBackend,
    ProvisionerBackend,
    ServerState,
    StorageMeter,
    operation_counts,
    operation_durations,
    warm_pool_counts,
)

__all__ = [
    "CONTENT_TYPE",
    "LiveFigures",
    "Metrics",
    "StorageSizes",
    "StoredFigures",
]

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Prometheus scrapes every 15 s by default: one read per scrape interval at most.
STATE_TTL_SECONDS = 10.0
STATE_READ_TIMEOUT_SECONDS = 3.0
# Latency buckets, in seconds, with an edge at each goal of issue 15 (acknowledgement p99 under
# 25 ms, received to operation.started p99 under 50 ms), so a scrape tells which side of a
# goal a tail is on; `bench/billing.py` reads quantiles off them.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class LiveFigures:
    """Figures this process keeps in memory, handed in at each scrape."""

    open_streams: int = 0
    stream_clients: int = 0
    redis_reconnects: int = 0
    delivered: int = 0
    dropped: int = 0
    malformed_messages: int = 0
    task_restarts: Mapping[str, int] = field(default_factory=dict)
    tasks_failing: frozenset[str] = frozenset()


@dataclass
class StoredFigures:
    """Figures read from PostgreSQL, shared by every instance."""

    inbox: Mapping[str, int] = field(default_factory=dict)
    inbox_oldest_seconds: float = 0.0
    webhooks: InboxCounts = field(default_factory=InboxCounts)
    operations: Mapping[tuple[str, str], int] = field(default_factory=dict)
    durations: Mapping[tuple[str, str], float] = field(default_factory=dict)
    # Warm pool databases by (server, state): `ready` is the pool's level.
    warm_pool: Mapping[tuple[str, str], int] = field(default_factory=dict)
    servers: Sequence[ServerState] = ()


class _StateCollector(Collector):
    def __init__(self) -> None:
        self.live = LiveFigures()
        self.stored = StoredFigures()
        # The size each provisioning server's warm pool is kept at, by server.
        self.warm_pool_sizes: Mapping[str, int] = {}

    def collect(self) -> Iterator[Metric]:
        s, live = self.stored, self.live
        yield _labelled_gauge(
            "lookout_webhook_inbox_events",
            "Stripe events in the inbox by status",
            ["status"],
            s.inbox,
        )
        yield GaugeMetricFamily(
            "lookout_webhook_inbox_oldest_unprocessed_seconds",
            "Age of the oldest Stripe event not yet processed (0 when none)",
            value=s.inbox_oldest_seconds,
        )
        yield from _webhook_gauges(s.webhooks)
        yield _labelled_gauge(
            "lookout_operations", "Operations by kind and status", ["kind", "status"], s.operations
        )
        yield _labelled_gauge(
            "lookout_operation_duration_seconds",
            "Duration of operations finished in the last hour, by kind and quantile",
            ["kind", "quantile"],
            s.durations,
        )
        yield from _warm_pool_gauges(s.warm_pool, self.warm_pool_sizes)
        yield from _server_gauges(s.servers)
        yield GaugeMetricFamily(
            "lookout_open_streams", "SSE streams open on this instance", value=live.open_streams
        )
        yield GaugeMetricFamily(
            "lookout_stream_subscribers",
            "Clients subscribed to the hub of this instance",
            value=live.stream_clients,
        )
        yield _counter(
            "lookout_redis_reconnects", "Times the hub reconnected to Redis", live.redis_reconnects
        )
        yield _counter(
            "lookout_events_delivered", "Event frames written to SSE clients", live.delivered
        )
        yield _counter(
            "lookout_slow_clients_dropped",
            "SSE clients cut off because they fell a full queue behind",
            live.dropped,
        )
        yield _counter(
            "lookout_malformed_messages",
            "Pub/sub messages on Lookout channels skipped because they were not announcements",
            live.malformed_messages,
        )
        restarts = CounterMetricFamily(
            "lookout_task_restarts",
            "Background tasks of this instance restarted after a crash, by task",
            labels=["task"],
        )
        failing = GaugeMetricFamily(
            "lookout_task_failing",
            "1 while a background task crash-loops (health checks answer 503), by task",
            labels=["task"],
        )
        for task, count in sorted(live.task_restarts.items()):
            restarts.add_metric([task], count)
            failing.add_metric([task], 1 if task in live.tasks_failing else 0)
        yield restarts
        yield failing


def _webhook_gauges(counts: InboxCounts) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "lookout_webhooks_pending",
        "Stripe events stored and not yet processed (first try or a retry to come)",
        value=counts.pending,
    )
    retrying = GaugeMetricFamily(
        "lookout_webhooks_retrying",
        "Pending Stripe events whose last try failed: error=transient when a dependency"
        " (Stripe, PostgreSQL, Redis) was down, permanent otherwise",
        labels=["error"],
    )
    retrying.add_metric(["transient"], counts.retrying_transient)
    retrying.add_metric(["permanent"], counts.retrying_permanent)
    yield retrying
    yield GaugeMetricFamily(
        "lookout_webhooks_failed",
        "Stripe events given up on (alert on > 0; `lookout webhooks list --failing`, then"
        " `lookout webhooks replay --failed`)",
        value=counts.failed,
    )


def _warm_pool_gauges(
    counts: Mapping[tuple[str, str], int], sizes: Mapping[str, int]
) -> Iterator[Metric]:
    servers = {server for server, _ in counts} | set(sizes)
    yield _labelled_gauge(
        "lookout_warm_pool_databases",
        "Graph databases of the warm pool by provisioning server and state (ready: the pool's"
        " level, taken by the next provisions; creating: being made)",
        ["server", "state"],
        {
            (server, state): counts.get((server, state), 0)
            for server in servers
            for state in ("ready", "creating")
        },
    )
    yield _labelled_gauge(
        "lookout_warm_pool_size",
        "The level each provisioning server's warm pool is refilled to (LOOKOUT_WARM_POOL_SIZE)",
        ["server"],
        sizes,
    )


def _server_gauges(servers: Sequence[ServerState]) -> Iterator[Metric]:
    graphs = GaugeMetricFamily(
        "lookout_provisioning_server_graphs",
        "Graphs on each provisioning server, those being placed included",
        labels=["server"],
    )
    weight = GaugeMetricFamily(
        "lookout_provisioning_server_weight",
        "The graphs each provisioning server is meant to hold (?lookout_weight=)",
        labels=["server"],
    )
    up = GaugeMetricFamily(
        "lookout_provisioning_server_up",
        "0 while this instance passes the provisioning server over (a connection to it failed"
        " within the last 10 s), 1 otherwise",
        labels=["server"],
    )
    drained = GaugeMetricFamily(
        "lookout_provisioning_server_drained",
        "1 for a drained provisioning server (no new graphs: `lookout servers drain`)",
        labels=["server"],
    )
    for state in servers:
        graphs.add_metric([state.name], state.graphs)
        drained.add_metric([state.name], 1 if state.drained else 0)
        if state.weight is not None:
            weight.add_metric([state.name], state.weight)
        if state.up is not None:
            up.add_metric([state.name], 1 if state.up else 0)
    yield from (graphs, weight, up, drained)


def _counter(name: str, documentation: str, value: int) -> Metric:
    return CounterMetricFamily(name, documentation, value=value)


def _labelled_gauge(
    name: str,
    documentation: str,
    labels: Sequence[str],
    values: Mapping[str, float] | Mapping[tuple[str, str], float],
) -> Metric:
    """A sample per key of ``values`` (one label's value, or a tuple of them), in key order."""
    gauge = GaugeMetricFamily(name, documentation, labels=labels)
    for key, value in sorted(values.items()):
        gauge.add_metric([key] if isinstance(key, str) else list(key), value)
    return gauge


class StorageSizes:
    """The size of each graph's database, measured by the backends that can (graphs), at most
    once per ``ttl`` seconds: ``pg_database_size`` walks every file of every database, a cost
    not worth paying on each scrape or page view. Measured, never enforced."""

    def __init__(self, *, ttl: float = 60.0, timeout: float = 5.0) -> None:
        self._meters: list[StorageMeter] = []
        self._ttl, self._timeout = ttl, timeout
        self._lock = anyio.Lock()
        self._next_read = 0.0  # time.monotonic() when the cache goes stale
        self.sizes: Mapping[str, int] = {}
        self.measured_at: datetime | None = None

    def measure(self, backends: Iterable[ProvisionerBackend]) -> None:
        self._meters = [b for b in backends if isinstance(b, StorageMeter)]

    async def read(self) -> Mapping[str, int]:
        """Sizes in bytes by resource id; the last known ones while the server is down."""
        async with self._lock:
            if not self._meters or time.monotonic() < self._next_read:
                return self.sizes
            self._next_read = time.monotonic() + self._ttl
            sizes: dict[str, int] = {}
            try:
                with anyio.fail_after(self._timeout):
                    for meter in self._meters:
                        sizes.update(await meter.storage_bytes())
            except DATABASE_ERRORS as exc:
                logger.warning("could not measure the graph databases' sizes: %r", exc)
                return self.sizes
            self.sizes, self.measured_at = sizes, datetime.now(UTC)
            return self.sizes


class _StorageCollector(Collector):
    def __init__(self, storage: StorageSizes) -> None:
        self._storage = storage

    def collect(self) -> Iterator[Metric]:
        yield _labelled_gauge(
            "lookout_graph_database_bytes",
            "Size of each graph's database (pg_database_size), measured at most once a minute",
            ["graph"],
            self._storage.sizes,
        )


class Metrics:
    def __init__(self, *, state_ttl: float = STATE_TTL_SECONDS, worker: int = 0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.events_published = Counter(
            "lookout_events_published",
            "Events published to Redis by this instance, by type",
            ["type"],
            registry=self.registry,
        )
        # -- server-side latency (issue 15): observed in memory where it happens ----------------
        self.webhook_ack = Histogram(
            "lookout_webhook_ack_seconds",
            "Stripe webhooks acknowledged (2xx) by this process: from the route's entry to the"
            " answer handed to the connection",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.webhook_write = Histogram(
            "lookout_webhook_write_seconds",
            "Stripe webhooks stored by this process, each in two phases: `waiting` for its"
            " group's write to begin (every writer busy), then `writing` until that write"
            " committed (the payments' statements and the WAL flush included)",
            ["phase"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.received_to_started = Histogram(
            "lookout_webhook_received_to_operation_started_seconds",
            "Payments confirmed by their checkout event as it is stored: from its receipt (the"
            " inbox row's received_at) to their operation.started published, on this process",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.loop_lag = Histogram(
            "lookout_event_loop_lag_seconds",
            "How late the event loop of this process woke a 10 ms timer (app.loop_lag)",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        Info(
            "lookout_process",
            "The process that answered this scrape: its pid, and which worker of"
            " `lookout serve --workers N` it is",
            registry=self.registry,
        ).info({"pid": str(os.getpid()), "worker": str(worker)})
        self._state = _StateCollector()
        self.registry.register(self._state)
        self.storage = StorageSizes()
        self.registry.register(_StorageCollector(self.storage))
        self._placed: list[PlacedGraphBackend] = []
        self._state_ttl = state_ttl
        self._read_at: float | None = None
        self._reading = anyio.Lock()

    def watch_servers(self, backends: Iterable[ProvisionerBackend]) -> None:
        """Reports the provisioning servers of the backends that place graphs over several."""
        self._placed = [b for b in backends if isinstance(b, PlacedGraphBackend)]

    async def refresh(self, pool: asyncpg.Pool, *, live: LiveFigures) -> None:
        """Takes ``live``; reads the stored figures again if they are older than the TTL."""
        self._state.live = live
        await self.storage.read()  # its own once-a-minute cache
        if self._fresh():
            return
        async with self._reading:
            if self._fresh():  # another scrape read them while this one waited
                return
            try:
                with anyio.fail_after(STATE_READ_TIMEOUT_SECONDS):
                    async with pool.acquire() as conn:
                        stored = await _read_stored(conn)
                        for placed in self._placed:
                            stored.servers = [*stored.servers, *await placed.states(conn)]
                        self._state.stored = stored
            except DATABASE_ERRORS as exc:
                # The last figures stand; the next scrape tries again.
                logger.warning("metrics not read from PostgreSQL (%s)", type(exc).__name__)
                return
            self._read_at = anyio.current_time()

    def watch_warm_pools(self, sizes: Mapping[str, int]) -> None:
        """The servers that keep a warm pool and its size: their level is reported, 0 too."""
        self._state.warm_pool_sizes = dict(sizes)

    def _fresh(self) -> bool:
        return self._read_at is not None and anyio.current_time() - self._read_at < self._state_ttl

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def _read_stored(conn: Connection) -> StoredFigures:
    inbox = await conn.fetch("SELECT status, count(*) AS n FROM webhook_events GROUP BY status")
    oldest = await conn.fetchval(
        "SELECT coalesce(extract(epoch FROM now() - min(received_at)), 0)"
        " FROM webhook_events WHERE status IN ('pending', 'processing', 'retrying')"
    )
    return StoredFigures(
        inbox={r["status"]: r["n"] for r in inbox},
        inbox_oldest_seconds=float(oldest or 0),
        webhooks=await inbox_counts(conn),
        operations=await operation_counts(conn),
        durations={
            (kind, str(q)): seconds
            for (kind, q), seconds in (await operation_durations(conn, (0.5, 0.99))).items()
        },
        warm_pool=await warm_pool_counts(conn),
    )
