"""`lookout demo` as a user runs it: a real process on embedded servers, in a data dir of the
test's, stopped by a signal."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import psutil

from tests.support.live import free_port
from tests.support.process import clean_environment

__all__ = ["DemoProcess", "demo_process", "server_data_dir", "servers_on", "start_demo"]

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def server_data_dir() -> Iterator[Path]:
    """A fresh LOOKOUT_DATA_DIR for embedded servers, removed afterwards. Not under pytest's
    tmp_path: a pytest session that starts meanwhile sets its root back to 0700, which locks
    PostgreSQL's own user (the tests run as root) out of its data dir midway."""
    path = ROOT / ".lookout" / "tests" / secrets.token_hex(4) / "data"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        for leftover in servers_on(path):
            with contextlib.suppress(psutil.Error):
                leftover.kill()
        shutil.rmtree(path.parent, ignore_errors=True)


def servers_on(data_dir: Path) -> list[psutil.Process]:
    """The postmaster and Valkey processes that belong to `data_dir`."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
            postgres = "postgres" in cmdline and f"-D {data_dir}/postgres" in cmdline
            valkey = "valkey-server" in cmdline and process.cwd().startswith(str(data_dir))
        except psutil.Error:
            continue
        if postgres or valkey:
            found.append(process)
    return found


@dataclass
class DemoProcess:
    data_dir: Path
    port: int
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_key(self) -> str:
        """The demo user's key, as the banner printed it."""
        for line in self.stdout.read_text().splitlines():
            if line.startswith("API key: "):
                return line.removeprefix("API key: ").strip()
        raise AssertionError(f"no API key line in {self.stdout.read_text()!r}")

    @property
    def stripe_key(self) -> str:
        """The emulator's generated secret key (its controls ask for it)."""
        return (self.data_dir / "stripe_api_key").read_text().strip()

    async def ready(self, within: float = 60) -> None:
        async with httpx.AsyncClient(base_url=self.url) as http:
            with anyio.fail_after(within):
                while True:
                    if self.process.poll() is not None:
                        raise AssertionError(
                            f"lookout demo exited with {self.process.returncode}:"
                            f" {self.stderr.read_text()}"
                        )
                    with contextlib.suppress(httpx.TransportError):
                        if (await http.get("/readyz")).status_code == 200:
                            return
                    await anyio.sleep(0.1)

    async def stop(self, signum: int = signal.SIGTERM, within: float = 10) -> int:
        """Sends `signum`; answers the exit code, once the process and its servers are gone."""
        self.process.send_signal(signum)
        with anyio.fail_after(within):
            while True:
                if self.process.poll() is not None and not servers_on(self.data_dir):
                    return self.process.returncode
                await anyio.sleep(0.05)

    def kill_all(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for leftover in servers_on(self.data_dir):
            with contextlib.suppress(psutil.Error):
                leftover.kill()


def start_demo(
    data_dir: Path, *, port: int | None = None, args: tuple[str, ...] = ()
) -> DemoProcess:
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    logs = data_dir.parent
    stdout, stderr = logs / f"demo-{port}.out", logs / f"demo-{port}.err"
    # The child writes to files of its own; the parent's handles close at once.
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "demo", "--port", str(port), *args],
            env=clean_environment(LOOKOUT_DATA_DIR=str(data_dir)),
            stdout=out,
            stderr=err,
        )
    return DemoProcess(data_dir, port, process, stdout, stderr)


@contextlib.asynccontextmanager
async def demo_process(data_dir: Path, *, port: int | None = None) -> AsyncIterator[DemoProcess]:
    """A demo that is ready; killed, with its servers, if the test left it running."""
    demo = start_demo(data_dir, port=port)
    try:
        await demo.ready()
        yield demo
    finally:
        demo.kill_all()
