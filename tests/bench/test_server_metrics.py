"""bench.server_metrics reads a run's figures off two scrapes of Lookout's own histograms."""

from __future__ import annotations

import math

import pytest

from app.web.metrics import Metrics
from bench.server_metrics import parse_metrics, quantile, report

pytestmark = pytest.mark.anyio


async def test_a_run_is_the_difference_of_two_scrapes_read_as_quantiles() -> None:
    metrics = Metrics(worker=1)
    for _ in range(50):
        metrics.webhook_ack.observe(0.3)  # before the run: not the run's
    pid, before = parse_metrics(metrics.render().decode())
    for _ in range(99):
        metrics.webhook_ack.observe(0.003)
    metrics.webhook_ack.observe(0.04)
    for _ in range(100):
        metrics.webhook_write.labels("waiting").observe(0.0002)
        metrics.webhook_write.labels("writing").observe(0.002)
    _, after = parse_metrics(metrics.render().decode())

    run = after["lookout_webhook_ack_seconds"] - before["lookout_webhook_ack_seconds"]
    assert pid.isdigit()
    assert run.count == 100
    assert 0.0025 <= quantile(run, 0.5) <= 0.005
    assert 0.025 < quantile(run, 0.995) <= 0.05
    assert math.isnan(quantile(after["lookout_event_loop_lag_seconds"], 0.5))
    ack, waiting, writing, started, lag = report(before, after)
    assert "n=100" in ack and "<= 25 ms:  99.00%" in ack
    # A labelled histogram is read series by series.
    assert "waiting for a writer" in waiting and "mean=    0.20 ms" in waiting
    assert "group's write" in writing and "mean=    2.00 ms" in writing
    assert started.endswith("n=0") and lag.endswith("n=0")
