"""`lookout demo` as a new user runs it, on embedded servers: a purchase in a quiet terminal,
controls and servers that ask for their secrets, real credentials, and a stop on SIGTERM or
SIGHUP (a closed terminal) that leaves no server behind."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import asyncpg
import httpx
import pytest

from tests.support.demo import demo_process, servers_on
from tests.support.process import clean_environment

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]


async def buy_a_graph(http: httpx.AsyncClient, stripe_key: str, name: str) -> dict[str, str]:
    """Checkout, the emulator's Pay (with its key), and the subscription turning active."""
    started = await http.post(
        "/v1/checkout", json={"plan": "graph-standard", "resource_name": name}
    )
    assert started.status_code == 201, started.text
    session_id = started.json()["checkout_session_id"]
    pay = f"/stripe/_emulator/checkout/{session_id}/pay"
    async with httpx.AsyncClient(base_url=http.base_url) as anonymous:
        assert (await anonymous.post(pay, json={})).status_code == 401
    paid = await http.post(pay, json={}, headers={"Authorization": f"Bearer {stripe_key}"})
    assert paid.status_code == 200, paid.text
    sub_id = started.json()["subscription_id"]
    with anyio.fail_after(60):
        while True:
            sub: dict[str, str] = (await http.get(f"/v1/subscriptions/{sub_id}")).json()
            if sub["status"] == "active":
                return sub
            assert sub["status"] in ("pending_payment", "provisioning"), sub
            await anyio.sleep(0.2)


async def test_a_demo_purchase_is_quiet_its_credentials_are_real_and_sigterm_stops_it_all(
    servers_data_dir: Path,
) -> None:
    async with demo_process(servers_data_dir) as demo:
        key = demo.api_key
        async with httpx.AsyncClient(
            base_url=demo.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as http:
            # The emulator's controls are refused without the demo's Stripe key.
            events = "/stripe/_emulator/events"
            async with httpx.AsyncClient(base_url=demo.url) as anonymous:
                assert (await anonymous.get(events)).status_code == 401
            assert (await http.get(events)).status_code == 401  # Lookout's key is not it
            sub = await buy_a_graph(http, demo.stripe_key, "quiet-graph")

            revealed = await http.post(f"/v1/graphs/{sub['resource_id']}/credentials")
            assert revealed.status_code == 200, revealed.text
            login = revealed.json()
            assert set(login) == {"host", "port", "database", "user", "password", "dsn"}
            assert login["host"] == "127.0.0.1"
            assert isinstance(login["port"], int)

            async def connect(user: str, password: str) -> asyncpg.Connection:
                return await asyncpg.connect(
                    host=login["host"],
                    port=login["port"],
                    database=login["database"],
                    user=user,
                    password=password,
                )

            conn = await connect(login["user"], login["password"])
            try:
                assert await conn.fetchval("SELECT current_user") == login["user"]
            finally:
                await conn.close()
            with pytest.raises(asyncpg.InvalidPasswordError):
                await connect(login["user"], "wrong-password")
            # PostgreSQL's superuser needs its password too; no guess opens it.
            for password in ("postgres", login["password"]):
                with pytest.raises(asyncpg.InvalidPasswordError):
                    await connect("postgres", password)

        assert await demo.stop(signal.SIGTERM) == 128 + signal.SIGTERM
        assert servers_on(servers_data_dir) == []

    # Quiet: the banner, no INFO lines of httpx, stripe or uvicorn for each request.
    out = demo.stdout.read_text().splitlines()
    assert out[0] == f"Dashboard: {demo.url}/"
    assert out[1] == f"API key: {key}"
    err = demo.stderr.read_text()
    assert " INFO " not in err, err
    assert str(servers_data_dir / "demo_api_key") in err  # where the key is kept
    assert len(err.splitlines()) <= 3, err


async def test_sighup_stops_the_demo_and_its_servers(servers_data_dir: Path) -> None:
    async with demo_process(servers_data_dir) as demo:
        assert len(servers_on(servers_data_dir)) == 2
        assert await demo.stop(signal.SIGHUP) == 128 + signal.SIGHUP
        assert servers_on(servers_data_dir) == []


def test_a_demo_on_a_busy_port_says_which_flag_picks_another(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "app", "demo", "--port", str(port)],
            env=clean_environment(LOOKOUT_DATA_DIR=str(tmp_path / "data")),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2
    assert "Dashboard:" not in done.stdout
    assert f"127.0.0.1:{port}" in done.stderr
    assert f"--port {port + 1}" in done.stderr
    assert "--host" in done.stderr
    assert "Traceback" not in done.stderr
    # Checked before anything was started.
    assert servers_on(tmp_path / "data") == []


async def test_the_embedded_servers_refuse_a_local_user_without_their_passwords(
    servers_data_dir: Path,
) -> None:
    from redis.asyncio import Redis
    from redis.exceptions import AuthenticationError, ResponseError

    from app.cli.embedded import embedded_servers

    with embedded_servers(servers_data_dir, database_url=None, redis_url=None) as servers:
        pg, valkey = httpx.URL(servers.database_url), httpx.URL(servers.redis_url)
        assert pg.host == valkey.host == "127.0.0.1"
        assert pg.password and valkey.password
        # Another local user knows the ports (they are no secret) but not the passwords.
        assert valkey.port is not None
        raw = Redis(host="127.0.0.1", port=valkey.port)
        try:
            with pytest.raises((AuthenticationError, ResponseError), match=r"(?i)auth"):
                await raw.xadd("lookout:forged", {"type": "subscription.updated"})
        finally:
            await raw.aclose()
        authed = Redis.from_url(servers.redis_url)
        try:
            assert await authed.ping()
        finally:
            await authed.aclose()
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(host="127.0.0.1", port=pg.port, user="postgres", password="x")
        with pytest.raises((asyncpg.InvalidPasswordError, asyncpg.InterfaceError)):
            await asyncpg.connect(host="127.0.0.1", port=pg.port, user="postgres", password="")
        conn = await asyncpg.connect(servers.database_url)
        try:
            assert await conn.fetchval("SELECT current_user") == "postgres"
        finally:
            await conn.close()
        for secret in ("postgres.password", "valkey.password"):
            assert (servers_data_dir / secret).stat().st_mode & 0o777 == 0o600
        assert (servers_data_dir / "valkey").stat().st_mode & 0o777 == 0o700
    assert servers_on(servers_data_dir) == []
