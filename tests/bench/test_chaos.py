"""The chaos soak, short: one minute of faults on a fixed seed, two real `lookout serve`
processes, then every invariant of bench.chaos (about four minutes with the settle; alone:
`pytest -m chaos`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.chaos

_SEED = 12


def _kill_group(process: subprocess.Popen[str]) -> None:
    """SIGTERM lets the soak stop what it started and drop its database; SIGKILL takes
    whatever of its process group is left (instances, emulator, redis-server)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.timeout(900)
def test_a_minute_of_chaos_keeps_every_payment_event_and_stream(pg_admin_dsn: str) -> None:
    soak = subprocess.Popen(
        [
            sys.executable, "-m", "bench.chaos", "--minutes", "1", "--instances", "2",
            "--seed", str(_SEED), "--customers", "5", "--settle", "150",
        ],
        env={**os.environ, "DATABASE_URL": pg_admin_dsn},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: nothing it starts can outlive the test
    )  # fmt: skip
    try:
        output, _ = soak.communicate(timeout=840)
    finally:
        _kill_group(soak)
    assert soak.returncode == 0, output
    assert "Result: every invariant holds" in output
