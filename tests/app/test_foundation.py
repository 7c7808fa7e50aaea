"""The ground every issue builds on: app factory, health, migrations, users, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import anyio
import asyncpg
import httpx
import pytest

from app.application import create_app
from app.db import migrate
from app.settings import Settings
from app.users import create_api_key, create_user, user_for_api_key
from tests.support import database_dsn, free_port, live_server
from tests.support.process import clean_environment, serve_process

pytestmark = pytest.mark.anyio


async def test_healthz_and_readyz_answer(settings: Settings) -> None:
    async with live_server(create_app(settings)) as url, httpx.AsyncClient(base_url=url) as http:
        # Each names the process that answered (`lookout serve --workers N` runs several).
        assert (await http.get("/healthz")).json() == {
            "status": "ok",
            "pid": os.getpid(),
            "worker": 0,
        }
        ready = await http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "pid": os.getpid(), "worker": 0}
        missing = await http.get("/v1/nothing-here")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "not_found"


async def test_readyz_is_503_with_the_reason_when_redis_is_gone(settings: Settings) -> None:
    app = create_app(settings)
    async with live_server(app) as url, httpx.AsyncClient(base_url=url) as http:
        # Point the live app at a port where nothing listens.
        services = app.state.services
        await services.redis.aclose()
        services.redis = type(services.redis).from_url(
            f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5
        )
        answer = await http.get("/readyz")
        assert answer.status_code == 503
        assert "redis" in answer.json()["error"]["message"]


async def test_migrations_apply_once_when_instances_race(pg_admin_dsn: str) -> None:
    admin = await asyncpg.connect(pg_admin_dsn)
    name = f"lookout_race_{os.getpid()}"
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        dsn = database_dsn(pg_admin_dsn, name)
        results: list[list[str]] = []

        async def one_instance() -> None:
            conn = await asyncpg.connect(dsn)
            try:
                results.append(await migrate(conn))
            finally:
                await conn.close()

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(one_instance)
        applied = [names for names in results if names]
        assert len(applied) == 1, results
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("SELECT name FROM schema_migrations")
        finally:
            await conn.close()
        assert sorted(r["name"] for r in rows) == sorted(applied[0])
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_api_keys_are_stored_only_as_hashes(db_pool: asyncpg.Pool) -> None:
    async with db_pool.acquire() as conn:
        user = await create_user(conn, "ada@example.com")
        key = await create_api_key(conn, user.id)
        assert (await user_for_api_key(conn, key)) == user
        assert await user_for_api_key(conn, key + "x") is None
        stored = await conn.fetchval("SELECT key_hash FROM api_keys WHERE user_id = $1", user.id)
        assert key.encode() not in stored


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        env=clean_environment(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_users_create_prints_the_key_alone(settings: Settings) -> None:
    assert settings.database_url and settings.redis_url
    env = {"DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url}
    done = await anyio.to_thread.run_sync(
        lambda: run_cli("users", "create", "g@example.com", env=env)
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("lk_")
    assert len(done.stdout.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"LOOKOUT_SECRET_KEY": ""}, "LOOKOUT_SECRET_KEY"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL"),
        ({"DATABASE_URL": "postgresql://127.0.0.1:1/none"}, "DATABASE_URL"),
    ],
)
async def test_bad_configuration_stops_serve_with_one_line(
    settings: Settings, env: dict[str, str], expected: str
) -> None:
    assert settings.database_url and settings.redis_url
    good = {
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "LOOKOUT_SECRET_KEY": "k" * 32,
        "STRIPE_API_KEY": "sk_test_x",
        "STRIPE_WEBHOOK_SECRET": "whsec_x",
    }
    args = ("serve", "--port", str(free_port()))
    done = await anyio.to_thread.run_sync(lambda: run_cli(*args, env={**good, **env}))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert expected in lines[0]
    assert "Traceback" not in done.stderr


async def test_settings_with_servers_keeps_everything_else(settings: Settings) -> None:
    moved = settings.with_servers("postgresql://h/db", "redis://h/0")
    assert replace(moved, database_url=settings.database_url, redis_url=settings.redis_url) == (
        settings
    )


@pytest.mark.timeout(90)
async def test_two_serve_processes_on_a_new_database_apply_the_schema_once(
    settings: Settings, pg_admin_dsn: str
) -> None:
    name = f"lookout_fresh_{os.getpid()}"
    admin = await asyncpg.connect(pg_admin_dsn)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{name}"')
    fresh = replace(settings, database_url=database_dsn(pg_admin_dsn, name))
    ready: list[str] = []
    try:

        async def one() -> None:
            async with serve_process(fresh) as server, httpx.AsyncClient() as http:
                answer = await http.get(f"{server.url}/readyz")
                ready.append(answer.json()["status"])

        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            tg.start_soon(one)
        assert ready == ["ready", "ready"]
        conn = await asyncpg.connect(fresh.database_url)
        try:
            names = [r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")]
        finally:
            await conn.close()
        assert len(names) == len(set(names)) >= 3
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
