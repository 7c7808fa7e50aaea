"""Liveness, readiness and metrics.

Liveness fails only when a background loop of the process cannot stay up (the supervisor's
failures): restarting the process is then the cure. Readiness also asks PostgreSQL and Redis.

Both answer anyone, so they name what is failing and no more: an error's text can carry a
host, a user or a query, and goes to the log instead. On a Redis Cluster readiness asks every
primary and names the one that does not answer by its cluster address (``host:port``, as
``CLUSTER NODES`` gives it), which an operator needs to find it. Both are the answering
process's own: under `lookout serve --workers N` each answer names its `pid` and `worker`.
"""

from __future__ import annotations

import hmac
import logging
import os
from typing import Any

import anyio
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from app.web.errors import error_response
from app.web.metrics import CONTENT_TYPE, LiveFigures
from app.web.services import Services, services
from provisioning import DATABASE_ERRORS
from streams import RedisClient

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
    except DATABASE_ERRORS as exc:
        logger.warning("readiness: PostgreSQL does not answer: %r", exc)
        problems["postgres"] = "unavailable"
    problems.update(await _redis_problems(found.redis))
    if problems:
        return _unavailable(
            found,
            "task_failing" if failing else "not_ready",
            "; ".join(f"{k}: {v}" for k, v in problems.items()),
            failing_tasks=failing,
        )
    return JSONResponse({"status": "ready", **_process(found)})


async def _redis_problems(redis: RedisClient) -> dict[str, str]:
    """What does not answer: the one Redis, or each primary of a Redis Cluster by its
    ``host:port`` (a primary that is down stops the slots it serves, so every one must answer;
    all are asked at once, each within the check's timeout)."""
    if not isinstance(redis, RedisCluster):
        try:
            with anyio.fail_after(CHECK_TIMEOUT_SECONDS):
                await redis.ping()
        except (OSError, RedisError, TimeoutError) as exc:
            logger.warning("readiness: Redis does not answer: %r", exc)
            return {"redis": "unavailable"}
        return {}
    try:
        with anyio.fail_after(CHECK_TIMEOUT_SECONDS):
            # The client's map of the cluster: refreshed by the command after one that failed
            # on a connection (a failover's new primary is asked then, the old one no more).
            await redis.initialize()  # a no-op unless a failure asked for it
            primaries = redis.get_primaries()
    except (OSError, RedisError, TimeoutError) as exc:
        logger.warning("readiness: the Redis Cluster does not answer: %r", exc)
        return {"redis": "unavailable (no node of the cluster answers)"}
    problems: dict[str, str] = {}

    async def ping(node: ClusterNode) -> None:
        try:
            with anyio.fail_after(CHECK_TIMEOUT_SECONDS):
                await redis.ping(target_nodes=node)
        except (OSError, RedisError, TimeoutError) as exc:
            logger.warning(
                "readiness: Redis Cluster primary %s does not answer: %r", node.name, exc
            )
            problems[f"redis primary {node.name}"] = "unavailable"

    async with anyio.create_task_group() as tg:
        for node in primaries:
            tg.start_soon(ping, node)
    return dict(sorted(problems.items()))


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
