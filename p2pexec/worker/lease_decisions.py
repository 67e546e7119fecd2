"""One lease's decisions on the worker, without sockets, processes or a clock: which task runs, which goes
back, when a slot leaves, how much credit to grant, and when the lease ends.

The daemon's lease server (:mod:`.daemon`) reports each task received, started, answered, withdrawn or
interrupted, each task boundary of a slot and each message it is about to send, with the time; the
answers say what to send or stop.  :class:`~p2pexec.protocol.lease.CreditLedger` counts the tasks (every
one received is answered exactly once); :class:`~.decisions.WorkerCore` holds what is shared with the
other leases (slots, who waits).

Fair sharing (:mod:`p2pexec.protocol.sharing`): a slot owed to a more deserving request leaves the
lease between two tasks; the last one hands back the tasks not started and ends the lease once its
running task is answered.  A lease older than ``lease_seconds`` that another client (or another need of
the same client) is waiting for gets no more credit; once it has answered what it holds, it ends, and
the slots go to whoever waited.  So does one that falls idle after its work while someone waits.  A
worker that is stopping grants no more credit either, hands back the tasks it has not started
(RETURNED: the client runs them elsewhere), and ends the lease once its running tasks are answered.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..protocol.lease import CreditLedger
from ..protocol.matching import credit_window
from .decisions import Action, WorkerCore

log = logging.getLogger("p2pexec.worker")

# A lease is idle once no task came this long after its last answer: a long task's next one comes only
# after the client has the answer and the credit, a round trip of up to a few hundred ms.
IDLE_GRACE = 0.5
# Short tasks queued behind a running one: their answers are held this long at most (and at most GATHER_OPS
# of them), so that several leave in one message, with one credit; a message costs both ends far more
# than an answer does (libp2p, Noise, yamux).  A lone task's answer, or a long task's, is never held.
GATHER_SECONDS = 0.001
GATHER_OPS = 64  # buffers in the outbox (an answer is one or two)
# Short tasks queued here go to a slot's task process together, up to this many: one write, and no wake-up
# of either process between them (a hop costs both ~75 us a task one at a time, ~40 in eights).
BATCH_MOST = 16


@dataclass
class Mail:
    """What the next message carries besides the answers: tasks handed back (RETURNED), then END or CREDIT."""

    returned: list[int] = field(default_factory=list)
    end: bool = False
    credit: int = 0


class LeaseDecisions:
    """One lease (``lease``: its offer's id) for ``client``'s request ``req`` on ``slots``; ``clock`` is monotonic seconds,
    ``now`` wall-clock seconds (the worker's sharing runs on the wall clock, like the requests' expiry)."""

    def __init__(self, worker: WorkerCore, lease: str, client: str, req: str, slots: list[int],
                 lease_seconds: float, clock: float, recycle: int | None = None) -> None:
        self.worker = worker
        self.lease = lease
        self.client = client  # (for the log)
        self.req = req
        self.slots = list(slots)  # the slot indices it holds now
        self.lease_seconds = lease_seconds
        self.ledger = CreditLedger(len(slots))
        self.started = self.answered_at = clock  # (answered_at: when a task was last answered)
        self.gave_way = False  # its last slot is owed elsewhere: no more credit, for good
        self.finished = False  # END is sent, or being sent: no more tasks start
        self.recycle = recycle  # tasks a task process takes before a fresh one (max_tasks_per_child), or None

    # -- tasks
    def task_received(self, task_id: int) -> bool:
        """A task came (ProtocolError if it was not credited); False: hand it back, the worker is stopping
        (it was sent on credit granted before we began to)."""
        self.ledger.task_received(task_id)
        if self.worker.draining:
            self.ledger.withdraw(task_id)
            return False
        return True

    def uncached(self, task_id: int) -> None:
        """A task refers to values we no longer hold: it is answered UNCACHED, and the client sends it again."""
        self.ledger.withdraw(task_id)

    def task_started(self, task_id: int) -> bool:
        """False if it was withdrawn or handed back while it waited (and answered then): skip it."""
        return self.ledger.task_started(task_id)

    def task_answered(self, task_id: int, seconds: float | None, clock: float) -> bool:
        """A started task ended (``seconds`` None: it was stopped); True when nothing is queued, so the
        lease may be idle: look again after IDLE_GRACE whether it should end."""
        self.ledger.task_answered(task_id, seconds)
        self.answered_at = clock
        return not self.ledger.queued

    def cancel(self, task_id: int, interrupt: bool) -> str | None:
        """WITHDRAW or INTERRUPT: ``cancelled`` (not started: answer CANCELLED now), ``interrupt`` (running:
        kill its task process, whose end answers it), or None (answered already, or unknown)."""
        if self.ledger.withdraw(task_id):
            return "cancelled"
        if interrupt and task_id in self.ledger.running:
            return "interrupt"
        return None

    # -- slots
    def leaves(self, slot: int, now: float) -> tuple[str, list[Action]] | None:
        """Between two tasks: does ``slot`` go to a more deserving request?  The member it goes to, and the
        offers to make.  (The last slot stays, and the lease ends instead: see :meth:`giving_way`.)"""
        if self.finished or len(self.slots) < 2:
            return None
        given = self.worker.give_slot(self.lease, slot, now)
        if given is None:
            return None
        owed, actions = given
        self.slots.remove(slot)
        self.ledger.shrink()
        return owed.party.member, actions

    def giving_way(self, now: float) -> bool:
        """Its last slot is owed to a more deserving request; once so, for good (the client was told, by
        RETURNED, that no more credit comes: the lease must end even if that request goes away)."""
        self.gave_way = self.gave_way or (len(self.slots) == 1 and self.worker.owed(self.lease, now) is not None)
        return self.gave_way

    def expired(self, clock: float, now: float) -> bool:
        """Stopping or giving way, or someone waits and this lease is idle after its work, or older than
        lease_seconds."""
        if self.worker.draining or self.giving_way(now):
            return True
        ledger = self.ledger
        done = (ledger.answered > 0 and not ledger.running and not ledger.queued
                and clock - self.answered_at >= IDLE_GRACE)
        return (done or clock - self.started > self.lease_seconds) and self.worker.contended(self.req, now)

    def batch_size(self, waiting: int, taken: int = 0) -> int:
        """How many tasks a slot hands its task process at once, ``waiting`` being queued here: the slots'
        fair share of them when tasks are short, else one (a long task must not hold others back); never
        more than the process may still take, having taken ``taken``."""
        mean = self.ledger.mean_seconds
        if self.finished or self.worker.draining or mean is None or mean >= GATHER_SECONDS:
            return 1
        size = 1 + min(BATCH_MOST - 1, max(0, waiting) // len(self.slots))
        return size if self.recycle is None else max(1, min(size, self.recycle - taken))

    def retires(self, taken: int) -> bool:
        """Does a task process that has taken ``taken`` tasks end before it takes another?"""
        return self.recycle is not None and taken >= self.recycle

    # -- messages
    def gathering(self, outbox: int) -> bool:
        """Hold the answers a moment (``outbox``: buffers waiting): short tasks are queued behind the running
        ones, so the next answer is due within moments, and the slots stay busy meanwhile."""
        ledger = self.ledger
        return (not self.finished and not self.worker.draining and bool(ledger.queued) and bool(ledger.running)
                and ledger.mean_seconds is not None and ledger.mean_seconds < GATHER_SECONDS
                and outbox < GATHER_OPS)

    def mail(self, clock: float, now: float) -> Mail:
        """What the message about to be sent carries besides the answers in the outbox."""
        mail = Mail()
        if self.worker.draining or (not self.finished and self.giving_way(now)):
            mail.returned = self._hand_back()
        if not self.finished and self.expired(clock, now) and self.ledger.answered == self.ledger.received:
            log.info("lease for %s ends after %.0f s: %s", self.client, clock - self.started,
                     "this worker is stopping" if self.worker.draining else "another client is waiting")
            self.finished = True
        if self.finished:
            mail.end = True
        elif not self.expired(clock, now):
            mail.credit = self._refill()
        return mail

    def _hand_back(self) -> list[int]:
        """Stopping or giving way: what has not started runs elsewhere, at once."""
        returned = sorted(self.ledger.queued)
        for task_id in returned:
            self.ledger.withdraw(task_id)
        return returned

    def _refill(self) -> int:
        """Credit to grant now: the client's window refills once half of what may queue here is answered, so
        it sends its tasks several to a message (and gets their answers so too)."""
        ledger = self.ledger
        queue = credit_window(ledger.slots, ledger.mean_seconds) - ledger.slots
        if ledger.outstanding > ledger.slots + queue // 2:
            return 0  # the client holds credit still, or its tasks are here: their answers bring this
        return ledger.grant()
