"""Task accounting of one lease, on the worker's side (pure, no I/O).

The client may have at most what it was credited outstanding; the worker
grants more as tasks are answered, sized by :func:`credit_window` from the
tasks' measured duration.  Every task received is answered exactly once:
with its result, or as cancelled when the client withdrew it before it
started or interrupted it.
"""

from __future__ import annotations

from collections import deque

from ..errors import ProtocolError
from .matching import credit_window

# A peer whose lease stream stays silent this long is gone (lid closed, network
# down, process frozen); each side sends a PING at least every HEARTBEAT_SECONDS.
HEARTBEAT_SECONDS = 2.0
SILENCE_SECONDS = 10.0
# A task's typical duration is the mean of the last RECENT ones, their longest eighth left out: on a busy
# machine a short task now and then measures milliseconds (its process waited for a CPU), and a mean that
# took it in turned batching off for the next ten tasks or more; tasks that are often long still count.
RECENT = 16


class CreditLedger:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.granted = 0
        self.received = 0
        self.answered = 0
        self.mean_seconds: float | None = None  # a task's typical duration (RECENT), None before the first
        self._recent: deque[float] = deque(maxlen=RECENT)
        self.queued: set[int] = set()  # received, not yet started
        self.running: set[int] = set()

    @property
    def outstanding(self) -> int:
        """Credited to the client and not yet answered."""
        return self.granted - self.answered

    def task_received(self, task_id: int) -> None:
        if self.received >= self.granted:
            raise ProtocolError(f"the client sent task {self.received + 1} with {self.granted} credited")
        if task_id in self.queued or task_id in self.running:
            raise ProtocolError(f"the client reused the id of task {task_id}, which is not answered yet")
        self.received += 1
        self.queued.add(task_id)

    def task_started(self, task_id: int) -> bool:
        """False if the task was withdrawn while it waited: skip it, it is answered already."""
        if task_id not in self.queued:
            return False
        self.queued.remove(task_id)
        self.running.add(task_id)
        return True

    def withdraw(self, task_id: int) -> bool:
        """Drop a task that has not started; True if it was, and must be answered as cancelled."""
        if task_id not in self.queued:
            return False  # running (interrupt it) or already answered (the answer is on its way)
        self.queued.remove(task_id)
        self.answered += 1
        return True

    def task_answered(self, task_id: int, seconds: float | None) -> None:
        """A started task ended; ``seconds`` is None when it was stopped and says nothing of its length."""
        if task_id not in self.running:
            raise RuntimeError(f"answered task {task_id}, which was not running")
        self.running.remove(task_id)
        self.answered += 1
        if seconds is not None:
            self._recent.append(seconds)
            kept = sorted(self._recent)[:len(self._recent) - len(self._recent) // 8]
            self.mean_seconds = sum(kept) / len(kept)

    def shrink(self) -> None:
        """One slot left the lease: the window it grants shrinks with it."""
        if self.slots <= 1:
            raise RuntimeError("a lease keeps its last slot until it ends")
        self.slots -= 1

    def grant(self) -> int:
        """Credits to send now so the client's window is full again."""
        extra = max(0, credit_window(self.slots, self.mean_seconds) - self.outstanding)
        self.granted += extra
        return extra
