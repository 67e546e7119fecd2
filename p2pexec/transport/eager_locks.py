"""Locks that take a free lock without a trip through trio's scheduler.

A trio ``Lock.acquire`` is a checkpoint even when the lock is free: the
task goes to the back of the run queue and the loop turns (an epoll poll
and its bookkeeping) before it holds the lock.  py-libp2p 0.8.1 takes
such a lock at every layer of every message (the TCP stream's read and
write locks, yamux's stream, window, write and streams locks, its
read-write lock's two, the net stream's state lock): about a dozen turns
of the loop per round trip on each end, none of which waits for anything
(measured in ``benchmarks/README.md``).

An :class:`Eager` lock or semaphore takes a free one at once and
otherwise waits in line, first come first served, as trio's do: a release
hands it straight to the first waiter, so nobody overtakes a waiter.
Nothing else is lost: every one of those paths goes on to a read or an
event wait, which yields, or to a write, which yields once the kernel's
buffer is full (:mod:`.tcp_stream`), and each writer of a lease stream
soon waits for credit or an event, so no task holds the loop.  They are
also lean: no owner check and no parking-lot breaker (trio's, for a task
that ends holding a lock), since each is taken in an ``async with`` or a
pair py-libp2p keeps; about 12 Python calls fewer per lock taken, a dozen
times per message.  :func:`p2pexec.transport.libp2p_config.eager_locks`
puts them in place of the locks py-libp2p creates; p2pexec's own
per-message locks are these too.
"""

from __future__ import annotations

from types import TracebackType

import trio


class Eager:
    """A trio Lock (``bound=1``) or Semaphore that does not yield while one is free; see the module docstring."""

    __slots__ = ("_bound", "_free", "_lot")

    def __init__(self, free: int, bound: int | None = None) -> None:
        self._free = free  # zero while anyone waits: a release hands over to the first waiter
        self._bound = bound
        self._lot = trio.lowlevel.ParkingLot()

    async def acquire(self) -> None:
        if self._free:
            self._free -= 1
        else:
            await self._lot.park()

    def acquire_nowait(self) -> None:
        if not self._free:
            raise trio.WouldBlock
        self._free -= 1

    def release(self) -> None:
        if self._lot:
            self._lot.unpark()
        elif self._free == self._bound:
            raise RuntimeError("released more often than acquired")
        else:
            self._free += 1

    def locked(self) -> bool:
        return not self._free

    @property
    def value(self) -> int:
        return self._free

    def statistics(self) -> trio.lowlevel.ParkingLotStatistics:
        """``tasks_waiting``, as trio's locks say."""
        return self._lot.statistics()

    __aenter__ = acquire

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.release()


def EagerLock() -> Eager:  # noqa: N802 - it stands in for a class
    return Eager(1, bound=1)


def EagerSemaphore(initial_value: int) -> Eager:  # noqa: N802
    return Eager(initial_value)
