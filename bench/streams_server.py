"""The server side of bench/streams_fanout.py: one process serving SSE streams of a topic.

``GET /stats`` answers the server's own view as JSON: the hub's counters (frames handed to
clients, clients cut off as slow, reconnects) and two lags from Redis's acceptance of an event
(its Stream id's clock): to the hub's receipt of its announcement (every announcement), and to
its frame's write to the socket (every frame of one connection in ``--sample-every``).
``?reset=1`` starts the lag samples afresh (the orchestrator does, as publishing starts).

Designs: ``hub`` (streams.EventHub + the plain ASGI EventStreamResponse, routed by Starlette),
``hub-direct`` (the same, served by streams.routing.DirectRoutes ahead of Starlette's
middleware), ``hub-sse-starlette``
(the same hub behind sse-starlette's EventSourceResponse) and ``per-connection`` (each client
its own redis-py pub/sub subscription, streamed by sse-starlette, as many services do).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import gc
import itertools
import time
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
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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


def since_accepted(stream_id: bytes) -> float:
    """Seconds since Redis accepted the event whose Stream id starts ``stream_id`` (its clock,
    in milliseconds: up to 1 ms more than the truth)."""
    return time.time() - int(stream_id[: stream_id.index(b"-")]) / 1000


class MeasuredHub(EventHub):
    """The hub, noting how long after Redis accepted each event its announcement arrived."""

    def __init__(self, redis: RedisClient, **kwargs: Any) -> None:
        super().__init__(redis, **kwargs)
        self.lags = array.array("d")

    def deliver(self, name: bytes, payload: bytes, now: float) -> None:
        self.lags.append(since_accepted(payload))
        super().deliver(name, payload, now)


def sampled_writes(app: ASGIApp, lags: array.array[float], every: int) -> ASGIApp:
    """``app``, noting for one connection in ``every`` how long after Redis accepted an event
    its frame was handed to the socket (the first frame of each write: the oldest)."""
    connections = itertools.count()

    async def sampled(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or next(connections) % every:
            await app(scope, receive, send)
            return

        async def timed(message: Message) -> None:
            await send(message)
            body = message.get("body")
            if body and body.startswith(b"id: "):
                lags.append(since_accepted(body[4:]))

        await app(scope, receive, timed)

    return sampled


def summary(lags: array.array[float]) -> dict[str, float | int]:
    ordered = sorted(lags)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else -1

    return {"n": len(ordered), "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": at(1.0)}


def build(
    design: str, redis_url: str, prefix: str, sample_every: int, *, cluster: bool = False
) -> ASGIApp:
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
    hub = MeasuredHub(redis, prefix=prefix, terminal_types=TERMINAL_EVENT_TYPES)
    written = array.array("d")

    async def stats(request: Request) -> Response:
        figures = {
            "offered": hub.stats.offered,
            "slow_clients_dropped": hub.stats.slow_clients_dropped,
            "reconnects": hub.reconnects,
            "subscribers": hub.subscriber_count(),
            "hub_received": summary(hub.lags),
            "written": summary(written),
        }
        if request.query_params.get("reset"):
            del hub.lags[:], written[:]
        return JSONResponse(figures)

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

    starlette_app = Starlette(
        routes=[Route("/t/{topic}/events", endpoint), Route("/stats", stats)], lifespan=lifespan
    )
    app: ASGIApp = starlette_app
    if design == "hub-direct":
        app = DirectRoutes(starlette_app, [("/t/{topic}/events", hub_stream)])
    return sampled_writes(app, written, sample_every)


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
    parser.add_argument(
        "--sample-every", type=int, default=10, help="time the writes of 1 connection in N"
    )
    parser.add_argument("--cluster", action="store_true", help="--redis-url names a cluster node")
    args = parser.parse_args()
    gc.set_threshold(50_000, 20, 20)
    config = uvicorn.Config(
        build(args.design, args.redis_url, args.prefix, args.sample_every, cluster=args.cluster),
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
