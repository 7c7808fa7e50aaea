"""What the lifespan owns, handed to every request through `request.app.state`."""

from __future__ import annotations

from dataclasses import dataclass

import anyio
import asyncpg
from redis.asyncio import Redis
from starlette.requests import HTTPConnection

from app.settings import Settings

__all__ = ["Services", "services"]


@dataclass
class Services:
    settings: Settings
    pool: asyncpg.Pool
    redis: Redis
    # Set when the process begins to stop: open streams say goodbye and close.
    shutting_down: anyio.Event


def services(connection: HTTPConnection) -> Services:
    found: Services = connection.app.state.services
    return found
