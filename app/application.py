"""`create_app(settings)`: the Starlette app and the one lifespan that owns its resources."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from app.db import create_pool, migrate
from app.errors import exception_handlers
from app.health import healthz, readyz
from app.services import Services
from app.settings import ConfigError, Settings

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
REDIS_MAX_CONNECTIONS = 500


def redis_client(url: str) -> Redis:
    # The asyncio pool's default of 100 connections is too few under load; the socket
    # timeouts keep a dead Redis from hanging a request forever.
    client: Redis = Redis.from_url(
        url,
        max_connections=REDIS_MAX_CONNECTIONS,
        socket_connect_timeout=5,
        health_check_interval=30,
    )
    return client


async def dashboard(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html")


def create_app(settings: Settings) -> Starlette:
    if settings.database_url is None or settings.redis_url is None:
        raise ConfigError(
            "DATABASE_URL and REDIS_URL must be known before create_app; "
            "start the embedded servers first (app.embedded)"
        )
    database_url, redis_url = settings.database_url, settings.redis_url

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool = await create_pool(database_url)
        redis = redis_client(redis_url)
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
            shutting_down = anyio.Event()
            async with anyio.create_task_group() as task_group:
                app.state.services = Services(
                    settings=settings, pool=pool, redis=redis, shutting_down=shutting_down
                )
                app.state.begin_shutdown = shutting_down.set
                yield
                shutting_down.set()
                task_group.cancel_scope.cancel()
        finally:
            await redis.aclose()
            await pool.close()

    routes: list[BaseRoute] = [
        Route("/", dashboard),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
    ]
    if STATIC_DIR.is_dir():
        routes.append(Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"))
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers=exception_handlers,
    )
