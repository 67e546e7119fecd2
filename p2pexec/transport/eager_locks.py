"""Locks that take a free lock without a trip through trio's scheduler.

A trio ``Lock.acquire`` is a checkpoint even when the lock is free: the
task goes to the back of the run queue and the loop turns (an epoll poll
and its bookkeeping) before it holds the lock.  py-libp2p 0.8.1 takes
such a lock at every layer of every message (the TCP stream's read and
write locks, yamux's stream, window, write and streams locks, its
read-write lock's two, the net stream's state lock): about a dozen turns
of the loop per round trip on each end, none of which waits for anything
(measured in ``benchmarks/README.md``).

:class:`Eager` locks and semaphores take a free lock at once
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


class Eager:
    """A trio Lock or Semaphore (wrapped, not subclassed: trio's are final) whose acquire does not yield
    while it is free."""

    __slots__ = ("_inner",)

    def __init__(self, inner: trio.Lock | trio.Semaphore) -> None:
        self._inner = inner

    async def acquire(self) -> None:
        try:
            self._inner.acquire_nowait()
        except trio.WouldBlock:
            await self._inner.acquire()

    def __getattr__(self, name: str) -> Any:  # acquire_nowait, release, locked, value, statistics
        return getattr(self._inner, name)

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._inner.release()


def EagerLock() -> Eager:  # noqa: N802 - it stands in for a class
    return Eager(trio.Lock())


def EagerSemaphore(initial_value: int) -> Eager:  # noqa: N802
    return Eager(trio.Semaphore(initial_value))
