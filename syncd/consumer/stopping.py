"""A consumer's graceful stop (`Consumer.stop`): the loop running it (`run`, `run_each`)
stops taking work at once, a read blocked in XREADGROUP included, lets the handler calls in
flight finish until a deadline and cancels what still runs then.

Cutting a blocked read short closes its connection (redis-py does on cancellation), so Redis
delivers nothing more on it; entries Redis handed over in the same instant stay pending, as do
the events of cancelled calls: they come back after `claim_idle_ms`, as after a crash. Nothing
is lost and nothing unhandled is acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Collection, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

# After cancelling a task, how long to wait for it to end. On Python 3.11 a cancellation that
# arrives while redis-py sends a command can be dropped (see `syncd.consumer.loop`); such a task
# is left to finish on its own rather than hold the stop up.
_CANCEL_WAIT_S = 1.0


class Stopping:
    """A stop request and its deadline, and whether a loop is still running."""

    def __init__(self) -> None:
        self._requested = asyncio.Event()
        self._changed = asyncio.Event()  # replaced by each request: wakes who waits on it
        self._deadline: float | None = None  # the event loop's time; None: none
        self._runs = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    @property
    def event(self) -> asyncio.Event:
        """Set once a stop was requested."""
        return self._requested

    def request(self, deadline: float | None) -> None:
        """Ask for a stop: in-flight calls get `deadline` seconds from now (None: as long as
        they take). A second request may shorten the deadline, never extend it."""
        at = None if deadline is None else asyncio.get_running_loop().time() + max(deadline, 0)
        sooner = at is not None and (self._deadline is None or at < self._deadline)
        if not self.requested or sooner:
            self._deadline = at
        self._requested.set()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def remaining(self) -> float | None:
        """Seconds left until the deadline (0 when past), None when there is none."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Around a loop: `stopped` waits for its end."""
        self._runs += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._runs -= 1
            if self._runs == 0:
                self._idle.set()

    async def stopped(self) -> None:
        """Return once no loop runs."""
        await self._idle.wait()

    async def interruptible(self, work: Awaitable[T]) -> T | None:
        """What `work` (a read) returns, or None when a stop is requested before it ends: it
        is then cancelled. Work that ended in the same instant counts: its result is returned."""
        task = asyncio.ensure_future(work)
        if not task.done() and not self.requested:
            try:
                await wait_any((self._requested,), tasks=(task,))
            except BaseException:
                await cancel(task)
                raise
        if task.done():
            return task.result()
        await cancel(task)
        return None

    async def bounded(self, work: Awaitable[T]) -> tuple[bool, T | None]:
        """Run `work` (handler calls, acknowledging what they handled) to its end or, once a
        stop is requested, until its deadline, then cancel it. Returns whether it ended, and
        what it returned."""
        task = asyncio.ensure_future(work)
        await self.until_deadline({task})
        if task.done():
            return True, task.result()
        await cancel(task)
        return False, None

    async def until_deadline(self, tasks: Collection[asyncio.Future[Any]]) -> None:
        """Wait until every one of `tasks` ended or, once a stop is requested, its deadline
        passed. Cancelled meanwhile, cancel them too."""
        try:
            while not all(task.done() for task in tasks):
                timeout = self.remaining()
                if timeout == 0:
                    return
                running = [task for task in tasks if not task.done()]
                await wait_any((self._changed,), timeout, tasks=running, every=True)
        except BaseException:
            for task in tasks:
                await cancel(task)
            raise


async def wait_any(
    events: Iterable[asyncio.Event],
    timeout: float | None = None,
    *,
    tasks: Iterable[asyncio.Future[Any]] = (),
    every: bool = False,
) -> None:
    """Return once one of `events` is set, after `timeout` seconds, or once one of `tasks`
    ended (with `every`: all of them)."""
    waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(e.wait()) for e in events]
    tasks = list(tasks)
    if not waiters and not tasks:
        await asyncio.sleep(timeout or 0)
        return
    try:
        if every and tasks:
            waiters.append(asyncio.ensure_future(asyncio.wait(tasks)))
            tasks = []
        await asyncio.wait([*waiters, *tasks], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def cancel(task: asyncio.Future[T]) -> None:
    """Cancel `task` and wait (briefly) for it to end; whatever it raised is dropped."""
    task.cancel()
    try:
        await asyncio.wait({task}, timeout=_CANCEL_WAIT_S)
    finally:
        if task.done():
            _retrieve(task)
        else:
            task.add_done_callback(_retrieve)


def _retrieve(task: asyncio.Future[T]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: asyncio does not log it as never retrieved
