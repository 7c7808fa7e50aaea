"""What the server saw, beside what the client saw: Lookout's latency histograms, scraped from
/metrics before and after a run, their difference read as quantiles.

    before = await scrape(url, workers=2)
    ... the run ...
    after = await scrape(url, workers=2)
    for text in report(before, after):
        print(text)

Under `lookout serve --workers N` each scrape reaches one worker: `scrape` opens new
connections until it has heard from ``workers`` distinct processes (`lookout_process_info`),
and adds their histograms up. A quantile read off buckets is an estimate within its bucket
(linear interpolation, as Prometheus' `histogram_quantile`); the bucket edges include the goals,
so which side of a goal a figure is on is exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["HISTOGRAMS", "Histogram", "parse_metrics", "quantile", "report", "scrape"]

# name (with its labels, if any) -> (what it measures, its goal in ms or None)
HISTOGRAMS: Mapping[str, tuple[str, float | None]] = {
    "lookout_webhook_ack_seconds": ("webhook acknowledgement", 25.0),
    # The acknowledgement's part in the intake: waiting for a writer, then the group's write
    # until its commit (PostgreSQL's part: statements, lock waits, the WAL flush).
    'lookout_webhook_write_seconds{phase="waiting"}': ("  of which waiting for a writer", None),
    'lookout_webhook_write_seconds{phase="writing"}': ("  of which its group's write", None),
    "lookout_webhook_received_to_operation_started_seconds": (
        "received -> operation.started published",
        50.0,
    ),
    "lookout_event_loop_lag_seconds": ("event-loop lag (10 ms ticks)", None),
}


@dataclass
class Histogram:
    """Cumulative bucket counts by upper edge (seconds, +Inf included), and the sum."""

    buckets: dict[float, float] = field(default_factory=dict)
    total: float = 0.0

    @property
    def count(self) -> float:
        return self.buckets.get(math.inf, 0.0)

    def __add__(self, other: Histogram) -> Histogram:
        edges = self.buckets.keys() | other.buckets.keys()
        return Histogram(
            {e: self.buckets.get(e, 0.0) + other.buckets.get(e, 0.0) for e in edges},
            self.total + other.total,
        )

    def __sub__(self, other: Histogram) -> Histogram:
        return Histogram(
            {e: n - other.buckets.get(e, 0.0) for e, n in self.buckets.items()},
            self.total - other.total,
        )


def parse_metrics(text: str) -> tuple[str, dict[str, Histogram]]:
    """The process's pid, and its histograms of interest."""
    pid = "?"
    found: dict[str, Histogram] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "lookout_process_info":
                pid = sample.labels["pid"]
            elif (name := family.name + _labels(sample.labels)) in HISTOGRAMS:
                histogram = found.setdefault(name, Histogram())
                if sample.name.endswith("_bucket"):
                    histogram.buckets[float(sample.labels["le"])] = sample.value
                elif sample.name.endswith("_sum"):
                    histogram.total = sample.value
    return pid, found


def _labels(labels: Mapping[str, str]) -> str:
    """A sample's labels but its bucket edge, as /metrics writes them: `{phase="waiting"}`."""
    named = [f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "le"]
    return "{" + ",".join(named) + "}" if named else ""


async def scrape(url: str, *, workers: int = 1, attempts: int = 50) -> dict[str, Histogram]:
    """The histograms of ``workers`` processes serving ``url``, added up."""
    by_pid: dict[str, dict[str, Histogram]] = {}
    for _ in range(attempts):
        # A new connection each time: each is the kernel's to hand to any worker.
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            answer = await http.get("/metrics")
        answer.raise_for_status()
        pid, histograms = parse_metrics(answer.text)
        by_pid[pid] = histograms
        if len(by_pid) >= workers:
            break
    else:
        print(
            f"(server figures from {len(by_pid)} of {workers} workers: the others never answered)"
        )
    summed: dict[str, Histogram] = {}
    for histograms in by_pid.values():
        for name, histogram in histograms.items():
            summed[name] = summed.get(name, Histogram()) + histogram
    return summed


def quantile(histogram: Histogram, q: float) -> float:
    """Seconds; +inf when it lies past the last finite edge."""
    if histogram.count <= 0:
        return math.nan
    rank = q * histogram.count
    lower, below = 0.0, 0.0
    for edge in sorted(histogram.buckets):
        cumulative = histogram.buckets[edge]
        if cumulative >= rank:
            if math.isinf(edge):
                return math.inf
            inside = cumulative - below
            return lower + (edge - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = edge, cumulative
    return math.inf


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f} ms" if math.isfinite(seconds) else "   (past the last bucket)"


def report(before: Mapping[str, Histogram], after: Mapping[str, Histogram]) -> Iterator[str]:
    """One line per histogram: what the run added to it."""
    for name, (what, goal) in HISTOGRAMS.items():
        run = after.get(name, Histogram()) - before.get(name, Histogram())
        label = f"server: {what}"
        if run.count <= 0:
            yield f"{label:<48} n=0"
            continue
        within = ""
        if goal is not None:
            under = run.buckets.get(goal / 1000, math.nan) / run.count
            within = f"  <= {goal:g} ms: {under:7.2%} (goal: p99 < {goal:g} ms)"
        yield (
            f"{label:<48} n={run.count:<5.0f} p50~{_ms(quantile(run, 0.5))}"
            f"  p99~{_ms(quantile(run, 0.99))}  mean={_ms(run.total / run.count)}{within}"
        )
