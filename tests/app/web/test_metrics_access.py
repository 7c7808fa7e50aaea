"""/metrics is cheap (no table read per scrape) and, with LOOKOUT_METRICS_TOKEN, private."""

from __future__ import annotations

import secrets
from dataclasses import replace

import anyio
import asyncpg
import pytest

from app.settings import ConfigError, Settings
from tests.support.stack import running_stack

pytestmark = pytest.mark.anyio


async def test_with_a_token_metrics_need_it(settings: Settings) -> None:
    token = secrets.token_urlsafe(24)
    async with running_stack(replace(settings, metrics_token=token)) as stack:
        client = stack.anonymous
        for headers in (
            {},
            {"Authorization": "Bearer wrong-token-of-some-length"},
            {"Authorization": f"Basic {token}"},
            # The user's API key is not the metrics token either.
            {"Authorization": f"Bearer {stack.api_key}"},
        ):
            answer = await client.get("/metrics", headers=headers)
            assert answer.status_code == 401, headers
            assert answer.json()["error"]["code"] == "unauthorized"
            assert "LOOKOUT_METRICS_TOKEN" in answer.json()["error"]["message"]
            assert answer.headers["www-authenticate"].startswith("Bearer")
        # Bytes that are not ASCII: refused like any wrong token, not a 500.
        answer = await client.get("/metrics", headers={b"Authorization": "Bearer café".encode()})
        assert answer.status_code == 401
        answer = await client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200
        assert "lookout_events_published" in answer.text
        # Health checks stay open to the orchestrator.
        assert (await client.get("/healthz")).status_code == 200


async def test_without_a_token_metrics_are_open(settings: Settings) -> None:
    assert settings.metrics_token is None
    async with running_stack(settings) as stack:
        answer = await stack.anonymous.get("/metrics")
        assert answer.status_code == 200
        assert "lookout_task_restarts" in answer.text
        assert "lookout_malformed_messages_total" in answer.text


async def test_scrapes_do_not_read_the_tables_each_time(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        assert (await stack.anonymous.get("/metrics")).status_code == 200
        assert settings.database_url is not None
        locker = await asyncpg.connect(settings.database_url)
        try:
            # While anything holds the tables (here a lock nobody can read past), scrapes
            # answer from what was read before, and quickly.
            async with locker.transaction():
                await locker.execute(
                    "LOCK TABLE webhook_events, operations IN ACCESS EXCLUSIVE MODE"
                )
                with anyio.fail_after(10):
                    for _ in range(20):
                        answer = await stack.anonymous.get("/metrics", timeout=5)
                        assert answer.status_code == 200
                        assert "lookout_operations" in answer.text
        finally:
            await locker.close()


def test_the_metrics_token_is_read_from_the_environment() -> None:
    base = {
        "LOOKOUT_SECRET_KEY": secrets.token_urlsafe(32),
        "STRIPE_API_KEY": "sk_test_x",
        "STRIPE_WEBHOOK_SECRET": "whsec_x",
    }
    assert Settings.from_env(base).metrics_token is None
    token = secrets.token_urlsafe(24)
    assert Settings.from_env({**base, "LOOKOUT_METRICS_TOKEN": f" {token} "}).metrics_token == token
    for bad in ("short", "x" * 20 + " y", "caf\u00e9" * 5):
        with pytest.raises(ConfigError, match="LOOKOUT_METRICS_TOKEN"):
            Settings.from_env({**base, "LOOKOUT_METRICS_TOKEN": bad})
