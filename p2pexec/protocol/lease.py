"""Credit accounting of one lease, on the worker's side (pure, no I/O).

The client may have at most what it was credited outstanding; the worker
grants more as tasks are answered, sized by :func:`credit_window` from the
tasks' measured duration.
"""

from __future__ import annotations

from ..errors import ProtocolError
from .matching import credit_window


class CreditLedger:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.granted = 0
        self.received = 0
        self.answered = 0
        self.mean_seconds: float | None = None

    @property
    def outstanding(self) -> int:
        """Credited to the client and not yet answered."""
        return self.granted - self.answered

    def task_received(self) -> None:
        if self.received >= self.granted:
            raise ProtocolError(f"the client sent task {self.received + 1} with {self.granted} credited")
        self.received += 1

    def task_answered(self, seconds: float) -> None:
        if self.answered >= self.received:
            raise RuntimeError("answered more tasks than were received")
        self.answered += 1
        self.mean_seconds = seconds if self.mean_seconds is None else 0.8 * self.mean_seconds + 0.2 * seconds

    def grant(self) -> int:
        """Credits to send now so the client's window is full again."""
        extra = max(0, credit_window(self.slots, self.mean_seconds) - self.outstanding)
        self.granted += extra
        return extra
