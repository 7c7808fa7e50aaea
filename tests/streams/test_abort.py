from __future__ import annotations

import asyncio

import pytest

from streams.abort import TaskAborter

pytestmark = pytest.mark.anyio


async def test_abort_repeats_a_swallowed_cancellation_and_absorbs_its_own() -> None:
    aborters: list[TaskAborter] = []
    swallowed: list[str] = []

    async def victim() -> str:
        with TaskAborter() as aborter:
            aborters.append(aborter)
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                swallowed.append("once")  # as a careless library would
            await asyncio.sleep(30)  # the repeated cancellation ends this too
        return "ended"

    task = asyncio.get_running_loop().create_task(victim())
    await asyncio.sleep(0.01)
    aborters[0].abort()
    assert await asyncio.wait_for(task, 5) == "ended"
    assert swallowed == ["once"]
    assert task.cancelling() == 0
    aborters[0].abort()  # after the block: nothing to cancel


async def test_a_cancellation_from_elsewhere_goes_through() -> None:
    async def victim() -> None:
        with TaskAborter():
            await asyncio.sleep(30)

    task = asyncio.get_running_loop().create_task(victim())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
