"""`lookout serve` on embedded servers, as a new user runs it: up fast, and nothing left behind,
neither after Ctrl-C nor after a SIGKILL and a second start."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest

from app.cli.embedded import embedded_servers
from tests.support import free_port
from tests.support.demo import servers_on
from tests.support.process import clean_environment

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


def start(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    env = clean_environment(
        LOOKOUT_DATA_DIR=str(data_dir),
        LOOKOUT_SECRET_KEY="s" * 32,
        STRIPE_API_KEY="sk_test_embedded",
        STRIPE_WEBHOOK_SECRET="whsec_embedded",
    )
    return subprocess.Popen(
        # One process: the test kills it with SIGKILL and reuses its port at once.
        [sys.executable, "-m", "app", "serve", "--port", str(port), "--workers", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def wait_ready(port: int, within: float) -> float:
    began = time.monotonic()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        with anyio.fail_after(within):
            while True:
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        return time.monotonic() - began
                except httpx.TransportError:
                    pass
                await anyio.sleep(0.1)


async def test_ctrl_c_stops_everything_and_sigkill_then_restart_reuses_the_servers(
    servers_data_dir: Path,
) -> None:
    port = free_port()
    first = start(servers_data_dir, port)
    try:
        took = await wait_ready(port, within=15)
        assert took < 15
        assert len(servers_on(servers_data_dir)) == 2
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        # The servers outlive a killed process; the next start must reuse, not duplicate them.
        assert len(servers_on(servers_data_dir)) == 2

        second = start(servers_data_dir, port)
        await wait_ready(port, within=15)
        kinds = sorted(
            "valkey" if "valkey" in " ".join(p.cmdline()) else "postgres"
            for p in servers_on(servers_data_dir)
        )
        assert kinds == ["postgres", "valkey"]

        began = time.monotonic()
        second.send_signal(signal.SIGINT)
        second.wait(timeout=10)
        assert time.monotonic() - began < 10
        for _ in range(50):
            if not servers_on(servers_data_dir):
                break
            await anyio.sleep(0.1)
        assert servers_on(servers_data_dir) == []
    finally:
        if first.poll() is None:
            first.kill()
        for leftover in servers_on(servers_data_dir):
            leftover.kill()


async def test_the_last_of_two_processes_on_one_data_dir_stops_the_servers(
    servers_data_dir: Path,
) -> None:
    first_port, second_port = free_port(), free_port()
    first = start(servers_data_dir, first_port)
    second = None
    try:
        await wait_ready(first_port, within=15)
        second = start(servers_data_dir, second_port)
        await wait_ready(second_port, within=15)
        assert len(servers_on(servers_data_dir)) == 2

        second.send_signal(signal.SIGINT)
        second.wait(timeout=10)
        # The first process still has its servers, and still answers.
        assert len(servers_on(servers_data_dir)) == 2
        await wait_ready(first_port, within=5)

        first.send_signal(signal.SIGINT)
        first.wait(timeout=10)
        for _ in range(50):
            if not servers_on(servers_data_dir):
                break
            await anyio.sleep(0.1)
        assert servers_on(servers_data_dir) == []
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
        for leftover in servers_on(servers_data_dir):
            leftover.kill()


def test_a_relative_data_dir_starts_both_servers(
    servers_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As `bench.billing` names it (`.lookout/bench`): Valkey daemonizes into its directory
    before opening its log, so a relative path there made it exit at once."""
    monkeypatch.chdir(servers_data_dir.parent)
    relative = Path(servers_data_dir.name)
    with embedded_servers(relative, database_url=None, redis_url=None) as servers:
        assert servers.redis_url.startswith("redis://")
        assert len(servers_on(servers_data_dir)) == 2
    assert servers_on(servers_data_dir) == []
