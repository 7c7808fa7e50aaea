"""Liveness, readiness and metrics.

Liveness fails only when a background loop of the process cannot stay up (the supervisor's
failures): restarting the process is then the cure. Readiness also asks PostgreSQL and Redis.

Both answer anyone, so they name what is failing and no more: an error's text can carry a
host, a user or a query, and goes to the log instead. Both are the answering process's own:
under `lookout serve --workers N` each answer names its `pid` and `worker`.
"""

from __future__ import annotations

import hmac
import logging
import os
from typing import Any

import anyio
import asyncpg
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from app.web.errors import error_response
from app.web.metrics import CONTENT_TYPE, LiveFigures
from app.web.services import Services, services

__all__ = ["healthz", "metrics_endpoint", "readyz"]

logger = logging.getLogger(__name__)

CHECK_TIMEOUT_SECONDS = 2.0


def _failing_tasks(found: Services) -> list[dict[str, Any]]:
    # The supervisor logs every crash with its traceback; the answer leaves the error out.
    return [
        {
            "task": f.task,
            "crashes": f.crashes,
            "window_seconds": f.window_seconds,
            "message": (
                f"background task {f.task!r} crashed {f.crashes} times within "
                f"{f.window_seconds:g} s; restart the process (its log has the error)"
            ),
        }
        for f in found.supervisor.failing()
    ]


def _process(found: Services) -> dict[str, int]:
    """Which process answered: each worker of `lookout serve --workers N` has its own tasks."""
    return {"pid": os.getpid(), "worker": found.settings.worker}


def _unavailable(found: Services, code: str, message: str, **extra: Any) -> Response:
    return JSONResponse(
        {
            "status": "unavailable",
            "error": {"code": code, "message": message},
            **extra,
            **_process(found),
        },
        status_code=503,
    )


async def healthz(request: Request) -> Response:
    found = services(request)
    failing = _failing_tasks(found)
    if failing:
        return _unavailable(
            found, "task_failing", "; ".join(f["message"] for f in failing), failing_tasks=failing
        )
    return JSONResponse({"status": "ok", **_process(found)})


async def readyz(request: Request) -> Response:
    found = services(request)
    problems: dict[str, str] = {}
    failing = _failing_tasks(found)
    for task in failing:
        problems[f"task {task['task']}"] = task["message"]
    try:
        with anyio.fail_after(CHECK_TIMEOUT_SECONDS):
            async with found.pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        logger.warning("readiness: PostgreSQL does not answer: %r", exc)
        problems["postgres"] = "unavailable"
    try:
        with anyio.fail_after(CHECK_TIMEOUT_SECONDS):
            await found.redis.ping()
    except (OSError, RedisError, TimeoutError) as exc:
        logger.warning("readiness: Redis does not answer: %r", exc)
        problems["redis"] = "unavailable"
    if problems:
        return _unavailable(
            found,
            "task_failing" if failing else "not_ready",
            "; ".join(f"{k}: {v}" for k, v in problems.items()),
            failing_tasks=failing,
        )
    return JSONResponse({"status": "ready", **_process(found)})


def _authorized(request: Request, token: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # Bytes, so that a non-ASCII header is a plain mismatch rather than a TypeError.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode("utf-8", "surrogateescape"), token.encode()
    )


async def metrics_endpoint(request: Request) -> Response:
    found = services(request)
    token = found.settings.metrics_token
    if token is not None and not _authorized(request, token):
        return error_response(
            401,
            "unauthorized",
            "set Authorization: Bearer <LOOKOUT_METRICS_TOKEN> to read /metrics",
            {"WWW-Authenticate": 'Bearer realm="metrics"'},
        )
    live = LiveFigures(
        open_streams=found.leases.held,
        stream_clients=found.hub.subscriber_count(),
        redis_reconnects=found.hub.reconnects,
        delivered=found.hub.stats.offered,
        dropped=found.hub.stats.slow_clients_dropped,
        malformed_messages=found.hub.stats.malformed,
        task_restarts=found.supervisor.restarts,
        tasks_failing=frozenset(f.task for f in found.supervisor.failing()),
    )
    await found.metrics.refresh(found.pool, live=live)
    return Response(found.metrics.render(), media_type=CONTENT_TYPE)
