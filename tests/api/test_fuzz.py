"""Schemathesis fuzzes the live API against its own OpenAPI document.

A real uvicorn on a free port, real PostgreSQL and Redis, the Stripe emulator over HTTP, and a
signed-in user with a paid, provisioned graph. Every operation the app mounts gets a bounded,
seeded run of generated requests, valid and invalid: no answer may be a 5xx, and every answer
must conform to the document (status, content type, headers, body). The Stripe webhook is
fuzzed without a valid signature, so only its refusals (400, 413) are expected; the SSE routes
are read for at most one event or a second, so their status and headers are what is checked.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis import Case, CheckFunction
from schemathesis.config import SchemathesisConfig
from schemathesis.hooks import HookContext
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    positive_data_acceptance,
)

from app.application import create_app
from app.settings import Settings
from app.web.openapi import openapi_document
from app.web.ratelimit import LIMITS, RateLimits
from tests.api.routes import documented_operations, mounted_operations, shape
from tests.support import database_dsn
from tests.support.stack import running_stack

# Seeded and bounded: about a minute for every operation together on a busy 2-core machine.
FUZZ_CONFIG = SchemathesisConfig.from_dict(
    {
        "seed": 14,
        "generation": {
            "max-examples": 25,
            "deterministic": True,
            "mode": "all",
            "database": "none",
        },
        "phases": {"stateful": {"enabled": False}},
        "request-timeout": 10,
        "max-stream-events": 1,
        "operations": [
            # A live stream with nothing to say sends `retry:` and then only keep-alives.
            {"include-path-regex": "/events$", "request-timeout": 1},
        ],
    }
)
# The schema must exist when pytest collects (one test per operation), before the server
# does; the URL is the live one's at each call.
SCHEMA = schemathesis.openapi.from_dict(openapi_document("http://127.0.0.1"), config=FUZZ_CONFIG)
# Path parameter -> one of the user's real ids, filled in once the live stack has them.
REAL_IDS: dict[str, str] = {}


@SCHEMA.hook
def flatmap_path_parameters(
    context: HookContext, path_parameters: dict[str, Any] | None
) -> st.SearchStrategy[dict[str, Any] | None]:
    """Half the time, the user's real ids: the fuzzer gets past the 404s into the handlers."""
    if not path_parameters:
        return st.just(path_parameters)
    real = {name: REAL_IDS[name] for name in path_parameters if name in REAL_IDS}
    return st.sampled_from([path_parameters, {**path_parameters, **real}])


# Schema-valid requests refused by a rule no schema can state: events unsigned by Stripe
# (400); a plan change to a plan of another resource type (400); subscribing without a saved
# card (402 payment_method_required).
REFUSED_BEYOND_SCHEMA = {
    ("POST", "/v1/webhooks/stripe"),
    ("PATCH", "/v1/subscriptions/{}"),
    ("POST", "/v1/subscriptions"),
}


@dataclass
class LiveAPI:
    url: str
    api_key: str
    mounted: set[tuple[str, str]]
    documented: set[tuple[str, str]]


def _serve_in_thread(
    pg_admin_dsn: str, template: str, redis_url: str, data_dir: Path
) -> Iterator[LiveAPI]:
    """The whole stack in an event loop of its own thread: schemathesis calls it from this
    (synchronous) test thread over real sockets."""
    ready = threading.Event()
    stop = threading.Event()
    found: dict[str, Any] = {}

    async def serve() -> None:
        name = f"lookout_fuzz_{secrets.token_hex(4)}"
        admin = await asyncpg.connect(pg_admin_dsn)
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        try:
            settings = Settings.from_env(
                {
                    "DATABASE_URL": database_dsn(pg_admin_dsn, name),
                    "REDIS_URL": redis_url,
                    "LOOKOUT_DATA_DIR": str(data_dir),
                    "LOOKOUT_SECRET_KEY": secrets.token_urlsafe(32),
                    "STRIPE_API_KEY": "sk_test_lookout_fuzz",
                    "STRIPE_WEBHOOK_SECRET": "whsec_fuzz",
                    "LOOKOUT_REDIS_PREFIX": f"lookout-fuzz-{secrets.token_hex(4)}:",
                    "LOOKOUT_ENVIRONMENT": "test",
                    "LOOKOUT_MAX_STREAMS_PER_USER": "1000",
                }
            )
            async with running_stack(settings) as stack:
                # Thousands of requests a minute, many of them anonymous on purpose: at the
                # real limits most answers would be 429s (tests/app/web/test_rate_limits.py).
                services = stack.app.state.services
                services.rate_limits = RateLimits(
                    services.redis,
                    prefix=settings.redis_prefix,
                    limits=dict.fromkeys(LIMITS, "100000/minute"),
                )
                # Something of the user's to find: a paid, provisioned graph.
                checkout = await stack.checkout(name="fuzzed-graph")
                await stack.pay(checkout["checkout_session_id"])
                active = await stack.wait_for_status(checkout["subscription_id"], "active")
                REAL_IDS.update(
                    subscription_id=active["id"],
                    graph_id=active["resource_id"],
                    operation_id=active["operation_id"],
                    checkout_session_id=checkout["checkout_session_id"],
                )
                found["api"] = LiveAPI(
                    url=stack.url,
                    api_key=stack.api_key,
                    mounted=mounted_operations(create_app(stack.settings)),
                    documented=documented_operations(openapi_document(stack.url)),
                )
                ready.set()
                await anyio.to_thread.run_sync(stop.wait)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()

    def run() -> None:
        try:
            anyio.run(serve)
        except BaseException as exc:
            found["error"] = exc
        finally:
            ready.set()

    thread = threading.Thread(target=run, name="fuzzed-lookout", daemon=True)
    thread.start()
    ready.wait(timeout=90)
    try:
        if "api" not in found:
            raise RuntimeError("the live stack did not start") from found.get("error")
        yield found["api"]
    finally:
        stop.set()
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def live_api(
    pg_admin_dsn: str,
    _template_database: str,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveAPI]:
    yield from _serve_in_thread(
        pg_admin_dsn, _template_database, redis_url, tmp_path_factory.mktemp("fuzz")
    )


@SCHEMA.parametrize()
@pytest.mark.timeout(120)
def test_the_api_answers_as_documented(case: Case[Any], live_api: LiveAPI) -> None:
    operation = (case.operation.method.upper(), shape(case.operation.path))
    if operation not in live_api.mounted:
        pytest.skip(f"{operation[0]} {case.operation.path} is not mounted yet")
    excluded: list[CheckFunction] = (
        [positive_data_acceptance] if operation in REFUSED_BEYOND_SCHEMA else []
    )
    siblings = {(m, p) for m, p in live_api.documented if p == operation[1]}
    if not siblings <= live_api.mounted:
        # `Allow` cannot list a method another branch has not mounted yet.
        excluded.append(allow_header_conformance)
    case.call_and_validate(
        base_url=live_api.url,
        headers={"Authorization": f"Bearer {live_api.api_key}"},
        excluded_checks=excluded,
    )
