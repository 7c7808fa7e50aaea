"""`lookout webhooks list` and `replay`, run as an operator runs them: a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import asyncpg
import pytest

from app.billing.webhooks.receiver import parse_event, store_events
from tests.support.stripe_events import make_event, stripe_object

pytestmark = pytest.mark.anyio


async def _lookout(
    database_url: str, redis_url: str, tmp_path: Path, *args: str
) -> subprocess.CompletedProcess[bytes]:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "LOOKOUT_DATA_DIR": str(tmp_path / "data"),
    }
    with anyio.fail_after(30):
        return await anyio.run_process([sys.executable, "-m", "app", *args], env=env, check=False)


async def test_webhooks_list_shows_pending_and_failing_events_one_line_each(
    db_pool: asyncpg.Pool, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    events = {
        status: parse_event(json.dumps(make_event("invoice.paid", stripe_object("invoice"))))
        for status in ("processed", "pending", "retrying", "failed")
    }
    async with db_pool.acquire() as conn:
        await store_events(conn, list(events.values()))
        await conn.execute(
            "UPDATE webhook_events SET status = 'processed', attempts = 1 WHERE id = $1",
            events["processed"].id,
        )
        await conn.execute(
            "UPDATE webhook_events SET status = 'retrying', attempts = 40,"
            " last_error = $2, last_error_kind = 'transient' WHERE id = $1",
            events["retrying"].id,
            "PaymentProviderUnavailable: Stripe is unavailable\n(Network error); retry later",
        )
        await conn.execute(
            "UPDATE webhook_events SET status = 'failed', attempts = 8,"
            " last_error = 'KeyError: data', last_error_kind = 'permanent' WHERE id = $1",
            events["failed"].id,
        )

    async def listed(*flags: str) -> dict[str, str]:
        done = await _lookout(database_url, redis_url, tmp_path, "webhooks", "list", *flags)
        assert done.returncode == 0, done.stderr.decode()
        lines = done.stdout.decode().splitlines()
        return {line.split()[0]: line for line in lines}

    failing = await listed("--failing")
    assert sorted(failing) == sorted([events["retrying"].id, events["failed"].id])
    retrying = failing[events["retrying"].id]
    assert retrying.split()[1:4] == ["invoice.paid", "retrying", "attempts=40"]
    assert "received=" in retrying and "next=20" in retrying
    assert "error(transient)=PaymentProviderUnavailable: Stripe is unavailable (Network" in retrying
    assert "next=-" in failing[events["failed"].id]
    assert "error(permanent)=KeyError: data" in failing[events["failed"].id]

    pending = await listed("--pending")
    assert sorted(pending) == sorted([events["pending"].id, events["retrying"].id])
    assert sorted(await listed()) == sorted(e.id for e in events.values())

    # The operator fixes the bug and replays: the failed one is pending again.
    replayed = await _lookout(database_url, redis_url, tmp_path, "webhooks", "replay", "--failed")
    assert replayed.returncode == 0, replayed.stderr.decode()
    assert sorted(await listed("--failing")) == [events["retrying"].id]
    refused = await _lookout(database_url, redis_url, tmp_path, "webhooks", "list", "--limit", "0")
    assert refused.returncode == 2 and b"--limit" in refused.stderr
