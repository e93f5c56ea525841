"""Shutdown cancels the daemon's helper tasks even when one swallows a cancellation (redis-py on
Python 3.11 can drop one that lands while a command is being sent)."""

from __future__ import annotations

import asyncio
import contextlib

from syncd.daemon import cancel_all


async def test_a_task_that_swallows_cancellations_is_cancelled_again_until_it_ends() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                swallowed += 1
                if swallowed == 3:
                    raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    assert await cancel_all([task], within=30)
    assert task.cancelled()
    assert swallowed == 3


async def test_gives_up_after_its_bound_and_says_so() -> None:
    release = asyncio.Event()

    async def immortal() -> None:
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(10)

    task = asyncio.create_task(immortal())
    await asyncio.sleep(0)
    assert not await cancel_all([task], within=0.3)
    assert not task.done()
    release.set()
    task.cancel()
    await asyncio.wait([task], timeout=5)
    assert task.done()


async def test_errors_of_finished_tasks_are_retrieved_not_raised() -> None:
    async def failing() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(failing())
    await asyncio.sleep(0)
    assert await cancel_all([task])
    assert isinstance(task.exception(), RuntimeError)
