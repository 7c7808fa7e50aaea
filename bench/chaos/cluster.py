"""The real parts: a PostgreSQL database of the run's own, a Redis server of the run's own, the
Stripe emulator and `lookout serve` processes, each a real child process that can be killed."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

__all__ = [
    "Instance",
    "RedisServer",
    "create_database",
    "drop_database",
    "free_port",
    "lookout_environment",
    "postgres_admin_url",
    "start_emulator",
    "stop_process",
    "wait_http",
    "wait_ready",
    "with_database",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


@contextlib.contextmanager
def postgres_admin_url() -> Iterator[str]:
    """The machine's PostgreSQL when DATABASE_URL is set, else the embedded one."""
    url = os.environ.get("DATABASE_URL", "").strip()
    if url:
        yield url
        return
    from app.cli.embedded import embedded_servers

    data_dir = Path(os.environ.get("LOOKOUT_DATA_DIR", "").strip() or "./.lookout").absolute()
    # A REDIS_URL is handed in only so that no embedded Redis starts: the soak runs its own.
    with embedded_servers(data_dir, database_url=None, redis_url="redis://unused") as servers:
        yield servers.database_url


def _redis_binary() -> str:
    from app.cli.embedded import redis_server_executable

    return redis_server_executable()


def stop_process(process: subprocess.Popen[bytes], *, timeout: float = 15) -> None:
    """SIGCONT (it may be stopped), SIGTERM, then SIGKILL: never leave a child behind."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGCONT)
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class RedisServer:
    """A redis-server of the run's own: an append-only file fsynced at every write, so a
    SIGKILL loses nothing it acknowledged, and a restart on the same port keeps the data."""

    port: int
    data_dir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = (self.data_dir / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [
                _redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                "--dir", str(self.data_dir), "--protected-mode", "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start; see {self.data_dir / 'redis.log'}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


def lookout_environment(**settings: str) -> dict[str, str]:
    """This process's environment without any Lookout setting, plus `settings`."""
    ours = ("LOOKOUT_", "STRIPE_", "DATABASE_URL", "REDIS_URL", "PROVISIONER_DATABASE_URL")
    return {k: v for k, v in os.environ.items() if not k.startswith(ours)} | settings


def start_emulator(port: int, api_key: str, secret: str, log: Path) -> subprocess.Popen[bytes]:
    """The Stripe emulator with no webhook URL: every event is held, for the soak to deliver
    on its own schedule (duplicates, reordering, retries)."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "app.demo.stripe_emulator", "--port", str(port),
                "--api-key", api_key, "--webhook-secret", secret,
            ],
            env=lookout_environment(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    return process


@dataclass
class Instance:
    """One `lookout serve` on a fixed port; restarted on the same port after a kill."""

    name: str
    port: int
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    stopped: bool = False  # SIGSTOPped by the soak
    ready: bool = False  # answered /readyz 200 since it last started
    starts: int = 0
    exits: list[int] = field(default_factory=list)  # exit codes the soak did not cause

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as out:
            out.write(f"\n=== start {self.starts} at {time.time():.3f}\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                # One process per instance: the soak kills and stops instances whole.
                [sys.executable, "-m", "app", "serve", "--port", str(self.port), "--workers", "1"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1
        self.ready = False

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def note_unexpected_exit(self) -> None:
        if self.process is not None and self.process.returncode is not None:
            self.exits.append(self.process.returncode)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.stopped = False

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self.stopped = True

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
        self.stopped = False

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


async def wait_ready(url: str, *, within: float, process: subprocess.Popen[bytes]) -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    async with httpx.AsyncClient(base_url=url, timeout=3) as http:
        while loop.time() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{url} exited with {process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get("/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} was not ready within {within} s")


async def wait_http(url: str, *, within: float) -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    async with httpx.AsyncClient(timeout=3) as http:
        while loop.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                await http.get(url)
                return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {within} s")


async def create_database(admin_url: str) -> str:
    name = f"lookout_chaos_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def drop_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
