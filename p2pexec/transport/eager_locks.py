"""Locks that take a free lock without a trip through trio's scheduler.

A trio ``Lock.acquire`` is a checkpoint even when the lock is free: the
task goes to the back of the run queue and the loop turns (an epoll poll
and its bookkeeping) before it holds the lock.  py-libp2p 0.8.1 takes
such a lock at every layer of every message (the TCP stream's read and
write locks, yamux's stream, window, write and streams locks, its
read-write lock's two, the net stream's state lock): about a dozen turns
of the loop per round trip on each end, none of which waits for anything
(measured in ``benchmarks/README.md``).

:class:`EagerLock` and :class:`EagerSemaphore` take a free lock at once
and otherwise wait exactly as trio's do (trio's ``acquire_nowait`` refuses
while anyone is queued, so the lock stays fair).  Nothing else is lost:
every one of those paths goes on to a socket call or an event wait, which
checkpoints, so no task can hold the loop.
:func:`p2pexec.transport.libp2p_config.eager_locks` puts them in place of
the locks py-libp2p creates; p2pexec's own per-message locks are these too.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import trio


class EagerLock:
    """A trio Lock (wrapped, not subclassed: trio's are final) whose uncontended acquire does not yield."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = trio.Lock()

    async def acquire(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    def acquire_nowait(self) -> None:
        self._lock.acquire_nowait()

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def statistics(self) -> Any:
        return self._lock.statistics()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._lock.release()


class EagerSemaphore:
    """A trio Semaphore whose acquire does not yield while a unit is free."""

    __slots__ = ("_semaphore",)

    def __init__(self, initial_value: int) -> None:
        self._semaphore = trio.Semaphore(initial_value)

    async def acquire(self) -> None:
        try:
            self._semaphore.acquire_nowait()
        except trio.WouldBlock:
            await self._semaphore.acquire()

    def acquire_nowait(self) -> None:
        self._semaphore.acquire_nowait()

    def release(self) -> None:
        self._semaphore.release()

    @property
    def value(self) -> int:
        return self._semaphore.value

    def statistics(self) -> Any:
        return self._semaphore.statistics()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._semaphore.release()
