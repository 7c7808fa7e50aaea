"""`lookout servers list | drain | undrain`, run as an operator runs them: a real process, two
real provisioning servers."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import anyio
import asyncpg
import pytest

from provisioning.servers import ProvisioningServer

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


async def _lookout(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    with anyio.fail_after(30):
        return await anyio.run_process(
            [sys.executable, "-m", "app", "servers", *args], env=env, check=False
        )


async def _graph_on(pool: asyncpg.Pool, user_id: str, server: str) -> str:
    graph = f"gr_{secrets.token_hex(12)}"
    await pool.execute(
        "INSERT INTO resources (id, resource_type, user_id, subject_id, plan, status, server,"
        " placed) VALUES ($1, 'graph', $2, $3, 'graph_standard', 'active', $4, true)",
        graph,
        user_id,
        f"sub_{secrets.token_hex(12)}",
        server,
    )
    return graph


async def test_an_operator_lists_drains_and_undrains_servers(
    db_pool: asyncpg.Pool,
    database_url: str,
    redis_url: str,
    pg_admin_dsn: str,
    second_pg_dsn: str,
    tmp_path: Path,
) -> None:
    first = ProvisioningServer.parse(pg_admin_dsn)
    second = ProvisioningServer.parse(second_pg_dsn)
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "LOOKOUT_DATA_DIR": str(tmp_path / "data"),
        "PROVISIONER_DATABASE_URL": f"{pg_admin_dsn}?lookout_weight=3, {second_pg_dsn}",
    }
    user_id = f"usr_{secrets.token_hex(12)}"
    await db_pool.execute("INSERT INTO users (id, email) VALUES ($1, $2)", user_id, "op@x.test")
    on_second = sorted([await _graph_on(db_pool, user_id, second.name) for _ in range(2)])
    await _graph_on(db_pool, user_id, first.name)
    left_behind = await _graph_on(db_pool, user_id, "retired.internal:5432")

    async def listed() -> list[str]:
        done = await _lookout(env, "list")
        assert done.returncode == 0, done.stderr.decode()
        assert done.stderr.decode().splitlines()[-1] == "3 server(s)"
        return done.stdout.decode().splitlines()

    assert await listed() == [
        f"{first.name}  up  graphs=1  weight=3",
        f"{second.name}  up  graphs=2  weight=1000",
        "retired.internal:5432  not-configured  graphs=1  weight=-",
        f"  {left_behind}  active  " + (await _subject(db_pool, left_behind)) + f"  user={user_id}"
        f"  created={await _created(db_pool, left_behind)}",
    ]

    drained = await _lookout(env, "drain", second.name)
    assert drained.returncode == 0, drained.stderr.decode()
    assert "its 2 graph(s) stay" in drained.stderr.decode()
    lines = await listed()
    assert lines[1] == f"{second.name}  drained,up  graphs=2  weight=1000"
    # A drained server's graphs follow it, one line each, for the operator to act on.
    assert sorted(line.split()[0] for line in lines[2:4]) == on_second
    async with db_pool.acquire() as conn:
        assert await conn.fetchval(
            "SELECT drained_at IS NOT NULL FROM provisioning_servers WHERE name = $1", second.name
        )

    unknown = await _lookout(env, "drain", "nowhere:5432")
    assert unknown.returncode == 2
    assert f"the servers are {first.name}, {second.name}" in unknown.stderr.decode()

    undrained = await _lookout(env, "undrain", second.name)
    assert undrained.returncode == 0, undrained.stderr.decode()
    assert (await listed())[1] == f"{second.name}  up  graphs=2  weight=1000"


async def _subject(pool: asyncpg.Pool, graph: str) -> str:
    found: str = await pool.fetchval("SELECT subject_id FROM resources WHERE id = $1", graph)
    return found


async def _created(pool: asyncpg.Pool, graph: str) -> str:
    found = await pool.fetchval("SELECT created_at FROM resources WHERE id = $1", graph)
    return str(found.isoformat(timespec="seconds"))
