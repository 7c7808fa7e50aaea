"""`GET /metrics`: what a person operating Lookout looks at, in Prometheus' text format.

Counters that change on a hot path live in memory (events published); everything that is
state (inbox depth and age, operations by status and duration) is read from PostgreSQL when
Prometheus asks, so every instance reports the same truth and nothing drifts. Each app has its
own registry: no module-level state.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.asyncio import Redis

from app.billing.inbox import InboxCounts, inbox_counts
from app.db import Connection
from streams import Event, EventPublisher

__all__ = ["CONTENT_TYPE", "CountingPublisher", "LiveFigures", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class LiveFigures:
    inbox: Mapping[str, int] = field(default_factory=dict)
    inbox_oldest_seconds: float = 0.0
    webhooks: InboxCounts = field(default_factory=InboxCounts)
    operations: Mapping[tuple[str, str], int] = field(default_factory=dict)
    durations: Mapping[tuple[str, str], float] = field(default_factory=dict)
    open_streams: int = 0
    stream_clients: int = 0
    redis_reconnects: int = 0
    delivered: int = 0
    dropped: int = 0


class _StateCollector(Collector):
    def __init__(self) -> None:
        self.snapshot = LiveFigures()

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        inbox = GaugeMetricFamily(
            "lookout_webhook_inbox_events",
            "Stripe events in the inbox by status",
            labels=["status"],
        )
        for status, count in sorted(s.inbox.items()):
            inbox.add_metric([status], count)
        yield inbox
        yield GaugeMetricFamily(
            "lookout_webhook_inbox_oldest_unprocessed_seconds",
            "Age of the oldest Stripe event not yet processed (0 when none)",
            value=s.inbox_oldest_seconds,
        )
        yield from _webhook_gauges(s.webhooks)
        operations = GaugeMetricFamily(
            "lookout_operations", "Operations by kind and status", labels=["kind", "status"]
        )
        for (kind, status), count in sorted(s.operations.items()):
            operations.add_metric([kind, status], count)
        yield operations
        durations = GaugeMetricFamily(
            "lookout_operation_duration_seconds",
            "Duration of operations finished in the last hour, by kind and quantile",
            labels=["kind", "quantile"],
        )
        for (kind, quantile), seconds in sorted(s.durations.items()):
            durations.add_metric([kind, quantile], seconds)
        yield durations
        yield GaugeMetricFamily(
            "lookout_open_streams", "SSE streams open on this instance", value=s.open_streams
        )
        yield GaugeMetricFamily(
            "lookout_stream_subscribers",
            "Clients subscribed to the hub of this instance",
            value=s.stream_clients,
        )
        yield _counter(
            "lookout_redis_reconnects", "Times the hub reconnected to Redis", s.redis_reconnects
        )
        yield _counter(
            "lookout_events_delivered", "Event frames written to SSE clients", s.delivered
        )
        yield _counter(
            "lookout_slow_clients_dropped",
            "SSE clients cut off because they fell a full queue behind",
            s.dropped,
        )


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


def _counter(name: str, documentation: str, value: int) -> Metric:
    return CounterMetricFamily(name, documentation, value=value)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.events_published = Counter(
            "lookout_events_published",
            "Events published to Redis by this instance, by type",
            ["type"],
            registry=self.registry,
        )
        self._state = _StateCollector()
        self.registry.register(self._state)

    async def refresh(self, conn: Connection, *, live: LiveFigures) -> None:
        inbox = await conn.fetch("SELECT status, count(*) AS n FROM webhook_events GROUP BY status")
        oldest = await conn.fetchval(
            "SELECT coalesce(extract(epoch FROM now() - min(received_at)), 0)"
            " FROM webhook_events WHERE status IN ('pending', 'processing', 'retrying')"
        )
        operations = await conn.fetch(
            "SELECT kind, status, count(*) AS n FROM operations GROUP BY kind, status"
        )
        durations = await conn.fetch(
            "SELECT kind, percentile_cont(0.5) WITHIN GROUP (ORDER BY seconds) AS p50,"
            " percentile_cont(0.99) WITHIN GROUP (ORDER BY seconds) AS p99"
            " FROM (SELECT kind, extract(epoch FROM finished_at - created_at) AS seconds"
            "       FROM operations WHERE finished_at > now() - interval '1 hour') AS recent"
            " GROUP BY kind"
        )
        live.webhooks = await inbox_counts(conn)
        live.inbox = {r["status"]: r["n"] for r in inbox}
        live.inbox_oldest_seconds = float(oldest or 0)
        live.operations = {(r["kind"], r["status"]): r["n"] for r in operations}
        live.durations = {
            (r["kind"], q): float(r[col])
            for r in durations
            for q, col in (("0.5", "p50"), ("0.99", "p99"))
        }
        self._state.snapshot = live

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CountingPublisher(EventPublisher):
    """The publisher, counting what it publishes by event type."""

    def __init__(self, redis: Redis, *, prefix: str, counter: Counter) -> None:
        super().__init__(redis, prefix=prefix)
        self._counter = counter

    async def publish_many(
        self, items: Sequence[tuple[Event, Iterable[str]]]
    ) -> list[dict[str, str]]:
        answers = await super().publish_many(items)
        for event, _ in items:
            self._counter.labels(event.type).inc()
        return answers
