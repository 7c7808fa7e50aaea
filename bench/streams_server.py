"""The server side of bench/streams_fanout.py: one process serving SSE streams of a topic.

Designs: ``hub`` (streams.EventHub + the plain ASGI EventStreamResponse, routed by Starlette),
``hub-direct`` (the same, served by streams.routing.DirectRoutes ahead of Starlette's
middleware), ``hub-sse-starlette``
(the same hub behind sse-starlette's EventSourceResponse) and ``per-connection`` (each client
its own redis-py pub/sub subscription, streamed by sse-starlette, as many services do).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import uvicorn
import uvloop
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from provisioning import TERMINAL_EVENT_TYPES
from streams import (
    ClusterClient,
    EventHub,
    EventStreamResponse,
    RedisClient,
    StreamOptions,
    channel_name,
)
from streams.hub import Signal
from streams.routing import DirectRoutes

OPTIONS = StreamOptions(keepalive_seconds=15, max_seconds=None)


async def no_snapshot(topic: str) -> Mapping[str, Any]:
    return {}


def build(design: str, redis_url: str, prefix: str, *, cluster: bool = False) -> ASGIApp:
    pool_class = ConnectionPool if design == "per-connection" else BlockingConnectionPool
    # Per-connection needs one Redis connection per client; the hub needs a few for history.
    max_connections = 25_000 if design == "per-connection" else 64
    redis: RedisClient
    if cluster:  # the hub subscribes sharded, one connection per primary
        if design == "per-connection":
            raise SystemExit("--cluster serves the hub designs only")
        redis = ClusterClient.from_url(redis_url, max_connections=max_connections)
    else:
        pool = pool_class.from_url(redis_url, max_connections=max_connections)
        redis = Redis(connection_pool=pool)
    hub = EventHub(redis, prefix=prefix, terminal_types=TERMINAL_EVENT_TYPES)

    async def hub_stream(request: Request) -> Response:
        topic = request.path_params["topic"]
        return EventStreamResponse(
            hub, topic, last_event_id=None, snapshot=no_snapshot, options=OPTIONS
        )

    async def hub_sse_starlette(request: Request) -> Response:
        topic = request.path_params["topic"]

        async def frames() -> AsyncIterator[ServerSentEvent]:
            async with hub.subscribe(topic, keepalive=3600) as sub:
                while isinstance(item := await sub.receive(), list) or item is Signal.IDLE:
                    for frame in item if isinstance(item, list) else ():
                        yield ServerSentEvent(
                            data=frame.data.decode(), event=frame.type, id=frame.id
                        )

        return EventSourceResponse(frames(), ping=15)

    async def per_connection(request: Request) -> Response:
        channel = channel_name(prefix, request.path_params["topic"])

        async def messages() -> AsyncIterator[ServerSentEvent]:
            assert isinstance(redis, Redis)
            pubsub = redis.pubsub()
            await pubsub.subscribe(channel)
            try:
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        stream_id, etype, data = message["data"].split(b"\n", 2)
                        yield ServerSentEvent(
                            data=data.decode(), event=etype.decode(), id=stream_id.decode()
                        )
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]

        return EventSourceResponse(messages(), ping=15)

    endpoint = {
        "hub": hub_stream,
        "hub-direct": hub_stream,
        "hub-sse-starlette": hub_sse_starlette,
        "per-connection": per_connection,
    }[design]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            await tg.start(hub.run)
            await hub.wait_connected()
            gc.collect()
            gc.freeze()  # start-up objects live for the whole run: keep the collector off them
            yield
            hub.close()
        await redis.aclose()

    starlette_app = Starlette(routes=[Route("/t/{topic}/events", endpoint)], lifespan=lifespan)
    if design == "hub-direct":
        return DirectRoutes(starlette_app, [("/t/{topic}/events", hub_stream)])
    return starlette_app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--design",
        default="hub",
        choices=["hub", "hub-direct", "hub-sse-starlette", "per-connection"],
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--prefix", default="bench:")
    parser.add_argument("--cluster", action="store_true", help="--redis-url names a cluster node")
    args = parser.parse_args()
    gc.set_threshold(50_000, 20, 20)
    config = uvicorn.Config(
        build(args.design, args.redis_url, args.prefix, cluster=args.cluster),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level="warning",
        access_log=False,
        backlog=8192,
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)

    async def serve() -> None:
        task = asyncio.create_task(server.serve())
        for _ in itertools.count():
            if server.started or task.done():
                break
            await asyncio.sleep(0.05)
        print("READY", flush=True)
        await task

    uvloop.run(serve())


if __name__ == "__main__":
    main()
