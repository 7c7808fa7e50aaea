"""`lookout serve --workers 2` as a real process: two worker processes answer on one port, a
purchase goes through them end to end, a worker killed with SIGKILL is replaced while the
other keeps serving, and SIGTERM stops them all within the contract's 10 s."""

from __future__ import annotations

import functools
import os
import secrets
import signal
import time
from pathlib import Path

import anyio
import asyncpg
import httpx
import psutil
import pytest

from app.server import WorkerStartupFailed, run_workers
from app.settings import Settings
from app.users import create_api_key, create_user
from provisioning import GraphBackend
from tests.support.live import free_port
from tests.support.process import ServeProcess, process_stripe, serve_process
from tests.support.stack import wait_for

pytestmark = pytest.mark.anyio


async def pids_answering(url: str, *, want: int, within: float = 60) -> set[int]:
    """The pids that answer /healthz on new connections, once ``want`` of them have."""
    seen: set[int] = set()

    async def enough() -> bool:
        # A new connection each time: each is the kernel's to hand to either worker.
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            answer = await http.get("/healthz")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["worker"] in range(want)
        seen.add(body["pid"])
        return len(seen) >= want

    await wait_for(enough, within=within, what=f"{want} workers to answer")
    return seen


async def stop_within_10_s(server: ServeProcess, workers: set[int]) -> None:
    began = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    code = await anyio.to_thread.run_sync(lambda: server.process.wait(timeout=10))
    took = time.monotonic() - began
    assert code == 128 + signal.SIGTERM
    assert took < 10
    # The parent reaped them: none is left, not even as a zombie.
    assert [pid for pid in workers if psutil.pid_exists(pid)] == []


async def drop_graphs(settings: Settings) -> None:
    """The graphs the served processes made (they have stopped): dropped on the test server."""
    assert settings.database_url is not None
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await conn.fetch(
            "SELECT resource_id FROM subscriptions WHERE resource_type = 'graph'"
        )
    finally:
        await conn.close()
    graphs = GraphBackend(settings.provisioning_servers[0].dsn)
    for row in rows:
        await graphs.teardown(row["resource_id"])


@pytest.mark.timeout(180)
async def test_two_workers_serve_one_port_and_a_purchase_completes(settings: Settings) -> None:
    assert settings.database_url is not None
    db = await asyncpg.connect(settings.database_url)
    user = await create_user(db, f"workers-{secrets.token_hex(3)}@example.com")
    key = await create_api_key(db, user.id)
    await db.close()
    try:
        async with (
            process_stripe(settings) as stripe,
            serve_process(stripe.settings, port=stripe.port, workers=2) as server,
        ):
            workers = await pids_answering(server.url, want=2)
            assert server.process.pid not in workers
            # The webhooks reach whichever worker the kernel picks; the one that stores the
            # payment starts the provisioning, and every worker answers for the subscription.
            async with httpx.AsyncClient(
                base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
            ) as http:
                started = await http.post(
                    "/v1/checkout", json={"plan": "graph-standard", "resource_name": "workers"}
                )
                assert started.status_code == 201, started.text
                session = started.json()["checkout_session_id"]
                paid = await stripe.control.post(f"/_emulator/checkout/{session}/pay")
                assert paid.status_code == 200, paid.text
                subscription = f"/v1/subscriptions/{started.json()['subscription_id']}"

                async def active() -> bool:
                    return bool((await http.get(subscription)).json()["status"] == "active")

                await wait_for(active, within=60, what="the subscription to be active")
            await stop_within_10_s(server, workers)
    finally:
        await drop_graphs(settings)


@pytest.mark.timeout(180)
async def test_a_killed_worker_is_replaced_while_the_other_serves(settings: Settings) -> None:
    async with serve_process(settings, workers=2) as server:
        workers = await pids_answering(server.url, want=2)
        killed = min(workers)
        os.kill(killed, signal.SIGKILL)
        # Every request is answered meanwhile: by the survivor, or (a connection the kernel
        # queued for the killed worker's socket) by its replacement once it is up.
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            for _ in range(5):
                assert (await http.get("/healthz")).status_code == 200
        now = await pids_answering(server.url, want=2)
        assert killed not in now
        assert workers - {killed} < now
        assert server.process.poll() is None
        await stop_within_10_s(server, now)


@pytest.mark.timeout(60)
def test_a_worker_that_cannot_start_stops_serve_instead_of_restarting_for_ever(
    tmp_path: Path,
) -> None:
    """A cause that every restart would hit (a worker exits before all have served) stops the
    parent, and the other workers with it; `lookout serve` prints it as one line."""
    # The workers exit before they connect anywhere: no server is needed.
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://127.0.0.1:1/none",
            "REDIS_URL": "redis://127.0.0.1:1/0",
            "LOOKOUT_DATA_DIR": str(tmp_path),
            "LOOKOUT_SECRET_KEY": "k" * 32,
            "STRIPE_API_KEY": "sk_test_x",
            "STRIPE_WEBHOOK_SECRET": "whsec_x",
        }
    )
    began = time.monotonic()
    with pytest.raises(WorkerStartupFailed, match=r"worker \d exited \(3\) before every worker"):
        run_workers(
            settings,
            host="127.0.0.1",
            port=free_port(),
            workers=2,
            prepare=functools.partial(os._exit, 3),
        )
    assert time.monotonic() - began < 30
