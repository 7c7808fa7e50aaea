"""Liveness and readiness. Readiness asks PostgreSQL and Redis, nothing else."""

from __future__ import annotations

import anyio
import asyncpg
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from app.metrics import CONTENT_TYPE, LiveFigures
from app.services import services

__all__ = ["healthz", "metrics_endpoint", "readyz"]

CHECK_TIMEOUT_SECONDS = 2.0


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    found = services(request)
    problems: dict[str, str] = {}
    try:
        with anyio.fail_after(CHECK_TIMEOUT_SECONDS):
            async with found.pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        problems["postgres"] = f"{exc.__class__.__name__}: {exc}"
    try:
        with anyio.fail_after(CHECK_TIMEOUT_SECONDS):
            await found.redis.ping()
    except (OSError, RedisError, TimeoutError) as exc:
        problems["redis"] = f"{exc.__class__.__name__}: {exc}"
    if problems:
        return JSONResponse(
            {
                "status": "unavailable",
                "error": {
                    "code": "not_ready",
                    "message": "; ".join(f"{k}: {v}" for k, v in problems.items()),
                },
            },
            status_code=503,
        )
    return JSONResponse({"status": "ready"})


async def metrics_endpoint(request: Request) -> Response:
    found = services(request)
    live = LiveFigures(
        open_streams=found.leases.held,
        stream_clients=found.hub.subscriber_count(),
        redis_reconnects=found.hub.reconnects,
        delivered=found.hub.stats.offered,
        dropped=found.hub.stats.slow_clients_dropped,
    )
    async with found.pool.acquire() as conn:
        await found.metrics.refresh(conn, live=live)
    return Response(found.metrics.render(), media_type=CONTENT_TYPE)
