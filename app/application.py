"""`create_app(settings)`: the Starlette app and the one lifespan that owns its resources."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import asyncpg
from redis.asyncio import BlockingConnectionPool, Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from app.billing.access_sweep import AccessSweep
from app.billing.checkout import CheckoutService
from app.billing.compensation import BillingHooks
from app.billing.invoices import Invoices
from app.billing.lifecycle import Lifecycle
from app.billing.provider import PaymentProvider
from app.billing.reconciler import Reconciler
from app.billing.stripe.provider import StripePaymentProvider
from app.billing.webhooks.handlers import StripeEventHandlers
from app.billing.webhooks.inbox import WebhookInbox
from app.billing.webhooks.intake import Unsettled, WebhookIntake
from app.db import create_pool, migrate
from app.loop_lag import LoopLagMonitor
from app.settings import ConfigError, Settings
from app.users import KeyStatus
from app.web.errors import exception_handlers
from app.web.headers import SecurityHeaders
from app.web.health import healthz, metrics_endpoint, readyz
from app.web.hosts import HostGuard
from app.web.metrics import Metrics
from app.web.openapi import openapi_document
from app.web.ratelimit import RateLimitMiddleware, RateLimits
from app.web.routes.billing import acknowledgement_timed, billing_routes, stripe_webhook
from app.web.routes.graphs import graph_routes
from app.web.routes.keys import key_routes
from app.web.routes.operations import operation_routes
from app.web.routes.plans import plan_routes
from app.web.routes.streams import answering_errors, direct_stream_routes, stream_routes
from app.web.services import Services
from provisioning import (
    HEAVY_AT_ONCE,
    TERMINAL_EVENT_TYPES,
    GraphBackend,
    OperationRunner,
    PlacedGraphBackend,
    ProvisionerBackend,
    RetryPolicy,
    SharedRepositoryBackend,
    WarmPool,
)
from streams import (
    ClusterClient,
    DirectRoutes,
    EventHub,
    EventPublisher,
    PackedConnection,
    RedisClient,
    StreamHandler,
    StreamLeases,
    StreamTokens,
    Supervisor,
)

__all__ = ["PROVISIONING_CONCURRENCY", "create_app", "redis_client"]

logger = logging.getLogger(__name__)


def _static_dir() -> Path:
    """The dashboard's files: inside the package where a wheel put them (app/static), else
    static/ at the top of the source tree (a clone, an editable install)."""
    here = Path(__file__).resolve().parent
    installed = here / "static"
    return installed if installed.is_dir() else here.parent / "static"


STATIC_DIR = _static_dir()
REDIS_MAX_CONNECTIONS = 500
REDIS_CONNECT_TIMEOUT_SECONDS = 5.0
# Lookout's slowest command is an XRANGE of a topic's whole Stream (a few thousand entries,
# milliseconds); 5 s is an outage, not a slow answer.
REDIS_SOCKET_TIMEOUT_SECONDS = 5.0
# Operations of this process running their steps at once. What floods PostgreSQL's WAL (CREATE
# and DROP DATABASE, the warm pool's copies) is limited apart, to provisioning.HEAVY_AT_ONCE (4)
# for the whole process (default_backends): a provision that takes a pooled database is left with
# catalog statements and round trips, which many can wait on at once. A running step holds one
# of the pool's 40 connections and may borrow a second (the warm pool's claim, the placement):
# 16 leave 8 for the webhooks and the loops, and no step can wait on a pool its peers emptied.
PROVISIONING_CONCURRENCY = 16


def redis_client(url: str, *, cluster: bool = False) -> RedisClient:
    # Past its limit the default pool raises instead of waiting for a free connection; the
    # socket timeouts keep a dead (or paused) Redis from hanging a request or a loop forever:
    # redis-py's default is no read timeout at all. Nothing on this client blocks on purpose
    # (no BLPOP, no XREAD BLOCK, no pub/sub): the hub reads pub/sub on a connection of its own
    # (streams.pubsub) with its own deadline, and takes only the connect timeout from here.
    if cluster:
        # Any node of the cluster: the client learns the others and the slot map from it, and
        # waits past its limit as the blocking pool does (streams.ClusterClient).
        return ClusterClient.from_url(
            url,
            max_connections=REDIS_MAX_CONNECTIONS,
            socket_connect_timeout=REDIS_CONNECT_TIMEOUT_SECONDS,
            socket_timeout=REDIS_SOCKET_TIMEOUT_SECONDS,
            health_check_interval=30,
        )
    pool = BlockingConnectionPool.from_url(
        url,
        # Commands packed by hiredis, not in Python: a quarter of the publisher's CPU
        # (streams.connection); a rediss:// or unix:// URL keeps redis-py's own connections.
        connection_class=PackedConnection,
        max_connections=REDIS_MAX_CONNECTIONS,
        timeout=10,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_SECONDS,
        socket_timeout=REDIS_SOCKET_TIMEOUT_SECONDS,
        health_check_interval=30,
    )
    # from_pool: closing the client closes its pool too.
    return Redis.from_pool(pool)


class LookoutApp(Starlette):
    """Serves its event streams ahead of its own middleware (see app.web.routes.streams).

    ``allowed_hosts``: the Host check comes first of all, ahead of the direct routes too."""

    def __init__(
        self,
        *,
        direct_routes: Sequence[tuple[str, StreamHandler]],
        allowed_hosts: Sequence[str],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._direct = HostGuard(
            DirectRoutes(super().__call__, direct_routes, scope_app=self), allowed_hosts
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._direct(scope, receive, send)


def default_backends(settings: Settings, pool: asyncpg.Pool) -> list[ProvisionerBackend]:
    """Graphs placed over every provisioning server (``pool``: Lookout's database, where each
    graph's server is recorded); the shared repository lives on the first server."""
    servers = settings.provisioning_servers
    assert servers, "DATABASE_URL must be known before the backends are built"
    # One limit of WAL-heavy statements for every server's backend: it protects this process's
    # webhooks as much as the servers.
    heavy = anyio.CapacityLimiter(HEAVY_AT_ONCE)
    graphs = PlacedGraphBackend(
        pool, [(server, GraphBackend(server.dsn, heavy=heavy)) for server in servers]
    )
    return [graphs, SharedRepositoryBackend(servers[0].dsn)]


async def dashboard(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html")


async def checkout_return_page(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "checkout-return.html")


def openapi_route(settings: Settings) -> Route:
    """`GET /openapi.json`: the document, rendered once, naming LOOKOUT_PUBLIC_URL."""
    body = json.dumps(openapi_document(settings.public_url)).encode()

    async def openapi(request: Request) -> Response:
        return Response(body, media_type="application/json")

    return Route("/openapi.json", openapi, methods=["GET"])


def create_app(
    settings: Settings,
    *,
    provider: PaymentProvider | None = None,
    backends: Sequence[ProvisionerBackend] | None = None,
    extra_routes: Sequence[BaseRoute] = (),
) -> Starlette:
    """The real payment provider and provisioning backends are the defaults; tests hand in
    their own where they need to inject a fault."""
    if settings.database_url is None or settings.redis_url is None:
        raise ConfigError(
            "DATABASE_URL and REDIS_URL must be known before create_app; "
            "start the embedded servers first (app.cli.embedded)"
        )
    database_url, redis_url = settings.database_url, settings.redis_url
    instance_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool = await create_pool(database_url)
        redis = redis_client(redis_url, cluster=settings.redis_cluster)
        payments = provider or StripePaymentProvider(
            settings.stripe_api_key,
            environment=settings.environment,
            api_base=settings.stripe_api_base,
        )
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
            metrics = Metrics(worker=settings.worker)
            published = metrics.events_published
            publisher = EventPublisher(
                redis,
                prefix=settings.redis_prefix,
                terminal_types=TERMINAL_EVENT_TYPES,
                on_published=lambda event: published.labels(event.type).inc(),
            )
            hub = EventHub(redis, prefix=settings.redis_prefix, terminal_types=TERMINAL_EVENT_TYPES)
            leases = StreamLeases(
                redis, prefix=settings.redis_prefix, limit=settings.max_streams_per_user
            )
            # Built bottom up, each part handed what it needs: the runner reports to billing's
            # hooks and gives way to the webhooks not yet settled; the lifecycle starts
            # operations on the runner; the webhook handlers follow the lifecycle.
            hooks = BillingHooks(pool, payments, publisher, instance_id=instance_id)
            unsettled = Unsettled()
            chosen = backends if backends is not None else default_backends(settings, pool)
            metrics.storage.measure(chosen)
            metrics.watch_servers(chosen)
            for backend in chosen:
                if isinstance(backend, PlacedGraphBackend):
                    await backend.name_older_graphs()
            runner = OperationRunner(
                pool,
                publisher,
                hooks,
                chosen,
                instance_id=instance_id,
                max_concurrent=PROVISIONING_CONCURRENCY,
                retry=RetryPolicy(outage_window=settings.provisioner_retry_seconds),
                give_way_to=unsettled,
            )
            # Graph databases made ahead of demand, one pool per graph backend's server; its
            # refill gives way to the webhooks and to the operations running here.
            warm_pools: list[WarmPool] = []
            for graphs in (
                inner
                for backend in chosen
                for inner in (
                    backend.server_backends
                    if isinstance(backend, PlacedGraphBackend)
                    else (backend,)
                )
                if isinstance(inner, GraphBackend)
            ):
                warm = WarmPool(
                    pool,
                    graphs,
                    size=settings.warm_pool_size,
                    instance_id=instance_id,
                    give_way_to=(unsettled, runner),
                )
                graphs.use_warm_pool(warm)
                warm_pools.append(warm)
            metrics.watch_warm_pools({w.server: w.size for w in warm_pools})
            lifecycle = Lifecycle(
                pool,
                publisher,
                runner,
                past_due_grace=timedelta(days=settings.past_due_grace_days),
            )
            invoices = Invoices(pool, payments, redis, publisher, prefix=settings.redis_prefix)
            inbox = WebhookInbox(
                pool, StripeEventHandlers(pool, payments, lifecycle, invoices=invoices)
            )
            intake = WebhookIntake(
                pool,
                inbox,
                unsettled=unsettled,
                observe_started=metrics.received_to_started.observe,
                observe_write=lambda phase, seconds: metrics.webhook_write.labels(phase).observe(
                    seconds
                ),
            )
            shutting_down = anyio.Event()
            supervisor = Supervisor()
            async with anyio.create_task_group() as task_group:
                # Every loop under the supervisor: a crash restarts that loop alone, where it
                # used to cancel this group and close the pool under a server still answering.
                await task_group.start(supervisor.run_starting, "event-hub", hub.run)
                await task_group.start(
                    supervisor.run_starting,
                    "operation-runner",
                    functools.partial(runner.run, supervisor=supervisor),
                )
                for warm in warm_pools:
                    task_group.start_soon(supervisor.run, f"warm-pool {warm.server}", warm.run)
                task_group.start_soon(supervisor.run, "stream-lease-renewer", leases.run)
                task_group.start_soon(supervisor.run, "webhook-inbox", inbox.run)
                task_group.start_soon(supervisor.run, "webhook-intake", intake.run)
                task_group.start_soon(supervisor.run, "stripe-cancellation-sweep", hooks.run_sweeps)
                task_group.start_soon(
                    supervisor.run, "subscription-reconciler", Reconciler(pool, lifecycle).run
                )
                access_sweep = AccessSweep(pool, lifecycle)
                task_group.start_soon(supervisor.run, "access-sweep", access_sweep.run)
                # --- issue 15: the event loop's lag, and the stack of any stall (app.loop_lag) ---
                lag = LoopLagMonitor(metrics.loop_lag.observe)
                task_group.start_soon(supervisor.run, "event-loop-lag", lag.run)
                app.state.services = Services(
                    settings=settings,
                    pool=pool,
                    redis=redis,
                    shutting_down=shutting_down,
                    publisher=publisher,
                    hub=hub,
                    leases=leases,
                    tokens=StreamTokens(settings.secret_key),
                    provider=payments,
                    lifecycle=lifecycle,
                    hooks=hooks,
                    runner=runner,
                    inbox=inbox,
                    intake=intake,
                    checkout=CheckoutService(
                        pool, payments, lifecycle, public_url=settings.public_url
                    ),
                    invoices=invoices,
                    rate_limits=RateLimits(redis, prefix=settings.redis_prefix),
                    metrics=metrics,
                    supervisor=supervisor,
                    key_status=KeyStatus(pool),
                )

                def begin_shutdown() -> None:
                    shutting_down.set()
                    supervisor.stop()  # the hub returns once closed: finished, not crashed
                    hub.close()

                app.state.begin_shutdown = begin_shutdown
                yield
                begin_shutdown()
                task_group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await payments.aclose()
                await redis.aclose()
                await pool.close()

    routes: list[BaseRoute] = [
        Route("/", dashboard),
        Route("/checkout/return", checkout_return_page),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
        openapi_route(settings),
        *billing_routes,
        *plan_routes,
        *operation_routes,
        *stream_routes,
        *graph_routes,
        *key_routes,
        *extra_routes,
    ]
    if STATIC_DIR.is_dir():
        routes.append(Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"))
    return LookoutApp(
        direct_routes=[
            *direct_stream_routes,
            # Stripe's burst of webhooks: the middleware stack was a quarter of each one's CPU.
            # Timed into lookout_webhook_ack_seconds (issue 15).
            ("POST /v1/webhooks/stripe", acknowledgement_timed(answering_errors(stripe_webhook))),
        ],
        # --- browser safety (issue 17): Host check here, security headers in the stack ---
        allowed_hosts=settings.allowed_hosts,
        routes=routes,
        lifespan=lifespan,
        exception_handlers=exception_handlers,
        middleware=[Middleware(SecurityHeaders), Middleware(RateLimitMiddleware)],
    )
