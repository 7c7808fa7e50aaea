"""What the lifespan owns, handed to every request through `request.app.state`."""

from __future__ import annotations

from dataclasses import dataclass

import anyio
import asyncpg
from starlette.requests import HTTPConnection

from app.billing.checkout import CheckoutService
from app.billing.compensation import BillingHooks
from app.billing.invoices import Invoices
from app.billing.lifecycle import Lifecycle
from app.billing.provider import PaymentProvider
from app.billing.webhooks.inbox import WebhookInbox
from app.billing.webhooks.intake import WebhookIntake
from app.settings import Settings
from app.users import KeyStatus
from app.web.metrics import Metrics
from app.web.ratelimit import RateLimits
from provisioning import OperationRunner
from streams import (
    EventHub,
    EventPublisher,
    RedisClient,
    StreamLeases,
    StreamTokens,
    Supervisor,
)

__all__ = ["Services", "services"]


@dataclass
class Services:
    settings: Settings
    pool: asyncpg.Pool
    redis: RedisClient
    # Set when the process begins to stop: open streams say goodbye and close.
    shutting_down: anyio.Event
    publisher: EventPublisher
    hub: EventHub
    leases: StreamLeases
    tokens: StreamTokens
    provider: PaymentProvider
    lifecycle: Lifecycle
    hooks: BillingHooks
    runner: OperationRunner
    inbox: WebhookInbox
    intake: WebhookIntake
    checkout: CheckoutService
    invoices: Invoices
    rate_limits: RateLimits
    metrics: Metrics
    # Every background loop of the process runs under it; health checks read its failures.
    supervisor: Supervisor
    # Open streams ask it whether the API key they were opened with is still unrevoked.
    key_status: KeyStatus


def services(connection: HTTPConnection) -> Services:
    found: Services = connection.app.state.services
    return found
