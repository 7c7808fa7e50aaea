"""The soak's fault schedule injects every kind it is asked for, for real, even when the
window is too short or a target is busy; the report fails a run that missed a kind or could
not inject one in full."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from bench.chaos.cluster import (
    RedisServer,
    create_database,
    drop_database,
    free_port,
    with_database,
)
from bench.chaos.invariants import faults_injected
from bench.chaos.proxy import FaultProxy
from bench.chaos.schedule import FaultRecord, Faults

pytestmark = pytest.mark.anyio


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def chaos_database(pg_admin_dsn: str) -> AsyncIterator[str]:
    name = await create_database(pg_admin_dsn)
    try:
        yield name
    finally:
        await drop_database(pg_admin_dsn, name)


def _idle_proxy(name: str) -> FaultProxy:
    """A proxy the kinds under test never touch (never listening)."""
    return FaultProxy(name, ("127.0.0.1", free_port()), free_port())


@pytest.mark.timeout(60)
async def test_every_kind_is_injected_once_even_past_a_short_window_and_a_busy_target(
    redis_server: RedisServer, pg_admin_dsn: str, chaos_database: str
) -> None:
    kinds = ("redis restart", "redis CLIENT KILL", "postgres backends terminated")
    faults = Faults(
        random.Random(3), [], redis_server, _idle_proxy("postgres"), _idle_proxy("redis"),
        _idle_proxy("provisioner"), _idle_proxy("stripe"), pg_admin_dsn, chaos_database,
        "http://127.0.0.1:1", kinds,
    )  # fmt: skip
    # A client of each server, for the faults to cut.
    victim = await asyncpg.connect(with_database(pg_admin_dsn, chaos_database))
    redis = Redis(port=redis_server.port, socket_timeout=5)
    await redis.ping()
    try:
        # Gaps of 3 s at least: the window is over before the second fault, and the two Redis
        # faults share their target.
        await faults.run(window=0.5, first_after=0.0)
    finally:
        await redis.aclose()
        await victim.close()
    assert sorted(r.kind for r in faults.records) == sorted(kinds)
    assert all(r.lifted is not None for r in faults.records)
    by_kind = {r.kind: r for r in faults.records}
    assert by_kind["postgres backends terminated"].detail == "1 backends terminated"
    assert victim.is_closed() or not await _alive(victim)
    inv = faults_injected(kinds, faults.records)
    assert inv.ok and inv.checked == 3, inv.violations


async def _alive(conn: asyncpg.Connection) -> bool:
    try:
        await conn.fetchval("SELECT 1")
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        return False
    return True


def test_a_run_that_missed_a_kind_or_half_injected_one_fails() -> None:
    records = [
        FaultRecord("redis restart", "redis", 0.0, lifted=1.0, detail="down 2.0 s"),
        FaultRecord(
            "postgres backends terminated",
            "postgres",
            2.0,
            lifted=2.1,
            detail=" (not fully injected: OSError: connection refused)",
        ),
    ]
    kinds = ("redis restart", "postgres backends terminated", "provisioner unreachable")
    inv = faults_injected(kinds, records)
    assert inv.checked == 3
    assert [v.split(":")[0] for v in inv.violations] == [
        "postgres backends terminated [postgres]",
        "provisioner unreachable",
    ]
    assert "never injected" in inv.violations[1]
