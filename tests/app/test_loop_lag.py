"""A call that blocks the event loop shows in the lag histogram, and the debug log names it:
the stack of the loop's thread taken during the stall, not after it."""

from __future__ import annotations

import logging
import time

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.application import create_app
from app.loop_lag import LoopLagMonitor
from app.settings import Settings
from tests.support.live import live_server

pytestmark = pytest.mark.anyio


def stall_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "app.loop_lag" and r.levelno == logging.DEBUG and "stalled" in r.getMessage()
    ]


def sleep_on_the_loop() -> None:
    time.sleep(0.2)


async def test_a_blocking_call_is_measured_and_named(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="app.loop_lag")
    lags: list[float] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(LoopLagMonitor(lags.append).run)
        await anyio.sleep(0.1)
        sleep_on_the_loop()
        await anyio.sleep(0.1)
        tg.cancel_scope.cancel()
    assert max(lags) >= 0.15
    named = [m for m in stall_messages(caplog) if "in sleep_on_the_loop" in m]
    assert len(named) == 1, stall_messages(caplog)
    assert "time.sleep(0.2)" in named[0]


async def test_without_debug_logging_the_lag_is_measured_and_nothing_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="app.loop_lag")
    lags: list[float] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(LoopLagMonitor(lags.append).run)
        await anyio.sleep(0.05)
        sleep_on_the_loop()
        await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert max(lags) >= 0.15
    assert stall_messages(caplog) == []


async def blocking_route(request: Request) -> Response:
    # Deliberately blocks the loop: what the monitor must catch in a real handler.
    time.sleep(0.2)  # noqa: ASYNC251
    return JSONResponse({"slept": True})


def lag_above(text: str, seconds: float) -> float:
    """Ticks of /metrics' lag histogram later than ``seconds`` (a bucket edge)."""
    buckets = {
        s.labels.get("le"): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "lookout_event_loop_lag_seconds"
        for s in family.samples
        if s.name.endswith("_bucket")
    }
    return buckets["+Inf"] - buckets[str(seconds)]


async def test_a_blocking_route_shows_in_the_metrics_and_the_log_names_it(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="app.loop_lag")
    app = create_app(settings, extra_routes=[Route("/block", blocking_route)])
    async with live_server(app, settings=settings) as url, httpx.AsyncClient(base_url=url) as http:
        before = lag_above((await http.get("/metrics")).text, 0.1)
        assert (await http.get("/block")).status_code == 200
        await anyio.sleep(0.05)  # the tick that ends the stall records it
        after = lag_above((await http.get("/metrics")).text, 0.1)
    assert after - before >= 1
    assert any("in blocking_route" in m and "time.sleep(0.2)" in m for m in stall_messages(caplog))
