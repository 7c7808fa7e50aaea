"""The supervisor restarts a crashed loop, reports one that cannot stay up, and lets
cancellation through."""

from __future__ import annotations

import logging

import anyio
import anyio.abc
import pytest

from streams import Supervisor
from tests.streams.sse_client import wait_until

pytestmark = pytest.mark.anyio


class Flaky:
    """A loop that raises ``crashes`` times, then serves until cancelled."""

    def __init__(self, crashes: int) -> None:
        self.crashes = crashes
        self.attempts = 0
        self.serving = anyio.Event()

    async def __call__(self) -> None:
        self.attempts += 1
        if self.attempts <= self.crashes:
            raise RuntimeError(f"crash number {self.attempts}")
        self.serving.set()
        await anyio.sleep_forever()


async def test_a_crash_is_logged_counted_and_the_loop_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    supervisor = Supervisor(backoff_min=0.01, backoff_max=0.05)
    loop = Flaky(crashes=2)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(supervisor.run, "flaky", loop)
            await loop.serving.wait()
            tg.cancel_scope.cancel()
    assert loop.attempts == 3
    assert supervisor.restarts == {"flaky": 2}
    assert supervisor.failing() == []
    crashes = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(crashes) == 2
    assert all("'flaky'" in r.getMessage() and r.exc_info is not None for r in crashes)


async def test_a_loop_crashing_too_often_is_failing_until_it_stays_up() -> None:
    supervisor = Supervisor(max_crashes=3, window_seconds=0.5, backoff_min=0.01, backoff_max=0.02)
    loop = Flaky(crashes=3)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(supervisor.run, "doomed", loop)
            await loop.serving.wait()
            [failure] = supervisor.failing()
            assert failure.task == "doomed"
            assert failure.crashes == 3
            assert "RuntimeError: crash number 3" in failure.last_error
            assert "'doomed'" in failure.message
            # Up for a whole window since: healthy again.
            await wait_until(lambda: not supervisor.failing())
            tg.cancel_scope.cancel()


async def test_backoff_is_capped_and_the_loop_keeps_being_restarted() -> None:
    supervisor = Supervisor(max_crashes=2, window_seconds=60, backoff_min=0.01, backoff_max=0.04)
    loop = Flaky(crashes=20)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(supervisor.run, "stubborn", loop)
            await loop.serving.wait()
            tg.cancel_scope.cancel()
    # 20 crashes at 0.04 s at most apart: well within the deadline, and still failing.
    assert supervisor.restarts == {"stubborn": 20}


async def test_cancellation_passes_through_and_is_not_a_crash() -> None:
    supervisor = Supervisor(backoff_min=0.01)
    loop = Flaky(crashes=0)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(supervisor.run, "calm", loop)
            await loop.serving.wait()
            tg.cancel_scope.cancel()
    assert supervisor.restarts == {"calm": 0}
    assert loop.attempts == 1


async def test_cancellation_during_the_backoff_passes_through() -> None:
    supervisor = Supervisor(backoff_min=30, backoff_max=30)
    loop = Flaky(crashes=1)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(supervisor.run, "sleeper", loop)
            await wait_until(lambda: supervisor.restarts.get("sleeper") == 1)
            tg.cancel_scope.cancel()
    assert loop.attempts == 1


async def test_a_loop_that_returns_by_itself_is_a_crash_and_is_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    supervisor = Supervisor(max_crashes=2, backoff_min=0.01, backoff_max=0.02)
    calls = 0
    serving = anyio.Event()

    async def quits_twice() -> None:
        nonlocal calls
        calls += 1
        if calls <= 2:
            return  # a stray return: its work would be left undone for good
        serving.set()
        await anyio.sleep_forever()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(supervisor.run, "quitter", quits_twice)
            await serving.wait()
            assert supervisor.restarts == {"quitter": 2}
            [failure] = supervisor.failing()
            assert failure.last_error == "returned without being stopped"
            tg.cancel_scope.cancel()
    assert calls == 3
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(logged) == 2
    assert all("'quitter'" in m and "returned without being stopped" in m for m in logged)


async def test_a_loop_that_returns_after_stop_is_finished() -> None:
    supervisor = Supervisor()
    calls = 0
    closing = anyio.Event()

    async def serves_until_closed() -> None:
        nonlocal calls
        calls += 1
        await closing.wait()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(supervisor.run, "hub", serves_until_closed)
            await wait_until(lambda: calls == 1)
            supervisor.stop()
            closing.set()
        # The group ended by itself: the loop was not run again.
    assert calls == 1
    assert supervisor.restarts == {"hub": 0}


async def test_a_starting_loop_releases_its_starter_once_across_restarts() -> None:
    supervisor = Supervisor(backoff_min=0.01, backoff_max=0.02)
    attempts = 0
    serving = anyio.Event()

    async def starting(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise RuntimeError("crash before reporting started")
        task_status.started()
        if attempts == 2:
            raise RuntimeError("crash after reporting started")
        serving.set()
        await anyio.sleep_forever()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(supervisor.run_starting, "starting", starting)
            await serving.wait()
            tg.cancel_scope.cancel()
    assert attempts == 3
    assert supervisor.restarts == {"starting": 2}


async def test_one_name_is_one_loop_at_a_time() -> None:
    supervisor = Supervisor()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(supervisor.run, "twice", anyio.sleep_forever)
            with pytest.raises(ValueError, match="already supervised"):
                await supervisor.run("twice", anyio.sleep_forever)
            tg.cancel_scope.cancel()


async def test_a_task_groups_error_is_reported_by_what_it_wraps() -> None:
    supervisor = Supervisor(max_crashes=1, backoff_min=30, backoff_max=30)

    async def grouped() -> None:
        async def fail() -> None:
            raise ConnectionResetError("reset by peer")

        async with anyio.create_task_group() as tg:
            tg.start_soon(fail)
            await anyio.sleep_forever()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(supervisor.run, "grouped", grouped)
            await wait_until(lambda: bool(supervisor.failing()))
            [failure] = supervisor.failing()
            assert failure.last_error == "ConnectionResetError: reset by peer"
            tg.cancel_scope.cancel()
