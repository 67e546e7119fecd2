"""The client's decisions, without sockets, threads or a clock: what to ask the board for, which offers
to accept, which task goes to which lease, retries, bans, cancellations, timeouts and warnings.

The adapter (:class:`~.scheduler.ClientScheduler`, on the trio loop) reports what happens and the time,
and carries out the actions returned (:mod:`.client_state`)::

    adapter                                       ClientCore                        answers
    ───────                                       ──────────                        ───────
    a board message ──────── on_message ────────► offers, hellos, declines      ──► Dial, Post, SayHello
    submits, a lease ended ─ maybe_request ─────► demand per need               ──► Post (request, withdraw)
    a lease's feeder ─────── take ──────────────► queue, credits, packages      ──► the next task, or None
    a worker's answer ────── returned, missing ─► requeue or cancel             ──► Cancel
    a slot given away ────── slots_taken ───────► the lease's slots, demand     ──► Post (request)
    a lease ended ────────── lease_ended ───────► retries, losses               ──► Fail, Cancel, Post
    every TICK ───────────── tick ──────────────► requests, Timeouts            ──► Fail, EndLease, Warn
    interrupt, shutdown ──── interrupt, ... ────► where each task is            ──► Cancel, Wake

The core reads the futures (a user may cancel one from any thread) and claims each as its task is sent
(``set_running_or_notify_cancel``), but never settles one: unpickling results and running callbacks are
the adapter's.  Like h11's ``ConnectionState``, it is not thread-safe; only :attr:`pending` takes
appends from other threads (:class:`~.pending.Pending`).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from .client_board import Matchmaker
from .client_state import (
    OFFERED, SKIP_AT_MOST, WAKE, Action, Cancel, Dial, Fail, LeaseState, SchedulerOptions, WorkItem, fail_waiting,
)
from .client_timeouts import Timeouts
from .errors import ProtocolError, WorkerLostError
from .pending import Pending
from .protocol import messages
from .protocol.frames import Op, encode_op
from .protocol.matching import REVISION, slots_to_accept, slots_wanted
from .protocol.resources import ANY, Need
from .protocol.values import SentValues
from .stats import ExecutorStats, Tally

if TYPE_CHECKING:
    from .fitting import Fitting

log = logging.getLogger("p2pexec.client")

MAX_PEERS_REMEMBERED = 1024  # workers whose held values we track; a forgotten one is sent them again
END, WAIT, IDLE = "end", "wait", "idle"  # :meth:`ClientCore.feeding`


class ClientCore(Matchmaker):
    """The queue of work, the leases' accounting and every decision on them; see the module docstring."""

    def __init__(self, me: str, cluster: str, options: SchedulerOptions, fitting: Fitting) -> None:
        super().__init__(me, cluster, options, fitting)
        self.pending: Pending[WorkItem] = Pending()  # appended by submitting threads
        self.leases: list[LeaseState] = []
        self.tally = Tally()  # done and failed futures, overall and per worker
        self.closing = False
        self.timeouts = Timeouts()
        self._cancel_queued = False  # shutdown(cancel_futures=True): queued work is withdrawn, not run
        self._sent_values: dict[str, SentValues] = {}  # peer -> the big values it should hold

    def sent_values(self, peer: str) -> SentValues:
        """What worker ``peer`` holds of our big values, as far as we know; kept across its leases."""
        sent = self._sent_values.get(peer)
        if sent is None:
            if len(self._sent_values) >= MAX_PEERS_REMEMBERED:
                del self._sent_values[next(iter(self._sent_values))]
            sent = self._sent_values[peer] = SentValues()
        return sent

    def hello_body(self) -> dict[str, Any]:
        """What our hello tells observers (``p2pexec status``)."""
        return {"role": "client", "node": self.request_id, "py": self.python, "rev": REVISION,
                "queued": len(self.pending), "running": self.inflight(), "done": self.tally.done,
                "failed": self.tally.failed,
                "leases": [{"worker": lease.label, "slots": lease.slots, "path": lease.path}
                           for lease in self.leases[:16]],
                "banned": {member: why[:200] for member, why in list(self.banned.items())[:8]}}

    # -- demand -------------------------------------------------------------------------
    def inflight(self) -> int:
        return sum(len(lease.inflight) for lease in self.leases)

    def wanted(self, need: Need) -> int:
        """Slots to lease for ``need``: its work, within what max_workers leaves after the other needs' leases."""
        if self.closing:
            return 0
        slots = inflight = others = 0
        for lease in self.leases:  # (once per submit: one pass)
            if lease.need == need:
                slots += lease.slots
                inflight += len(lease.inflight)
            else:
                others += lease.slots
        return slots_wanted(self.pending.count(need), inflight, slots, max(0, self.options.max_workers - others))

    def needs_waiting(self) -> list[Need]:
        return self.pending.needs()

    def accept(self, offer: messages.Message, need: Need, now: float) -> list[Action]:
        """A usable offer of ``need``: lease as many of its slots as the work wants."""
        if need == ANY:
            self.offered[offer["peer"]] = (offer["slots"], now)
        slots = slots_to_accept(offer["slots"], self.wanted(need))
        done: list[Action] = [OFFERED] if need == ANY else []
        if slots > 0:
            lease = LeaseState(offer.sender, offer["peer"], slots, offer.key, need,
                               messages.machine_name(offer.body.get("name")))
            self.leases.append(lease)
            done.append(Dial(lease, offer))
        return done

    def useful(self, need: Need, peer: str) -> bool:
        """Could that worker run any of the first tasks waiting with ``need`` (or is nothing waiting)?"""
        waiting = self.pending.head(need, SKIP_AT_MOST)
        return not waiting or any(self.fitting.misfit(peer, item.env) is None for item in waiting)

    def capacity(self, now: float) -> int:
        """Slots leased now, plus those offered in the last minute by workers not leased (joblib's n_jobs=-1)."""
        leased = {lease.peer for lease in self.leases}
        return sum(lease.slots for lease in self.leases) + sum(
            slots for peer, (slots, when) in self.offered.items() if peer not in leased and now - when < 60)

    # -- the leases ----------------------------------------------------------------------
    def take(self, lease: LeaseState, now: float) -> WorkItem | None:
        """The next task for ``lease`` to send, booked to it; None while it has no credit, would queue a task
        behind a busy slot while another idles, or has nothing its worker has the packages for."""
        if lease.credits <= 0 or not self.may_send(lease):
            return None
        skipped: list[WorkItem] = []
        taken = None
        while (item := self.pending.take(lease.need)) is not None:
            if item.started and item.future.done():  # interrupted while requeued
                continue
            if self.fitting.misfit(lease.peer, item.env) is not None:
                skipped.append(item)
                if len(skipped) >= SKIP_AT_MOST:
                    break
                continue
            if item.started or item.future.set_running_or_notify_cancel():
                item.started = True
                taken = item
                break
        for item in reversed(skipped):
            self.pending.appendleft(item)
        lease.stuck = taken is None and bool(skipped)
        if taken is not None:
            lease.credits -= 1
            lease.inflight[taken.id] = taken
            taken.ran_on = (lease.worker, lease.peer, lease.machine)
            if self.options.task_timeout is not None:
                taken.deadline = now + self.options.task_timeout
        return taken

    def may_send(self, lease: LeaseState) -> bool:
        """Fill idle slots anywhere before queueing a task behind a busy one (prefetch); with task_timeout, never
        queue one there: its clock starts when it is sent, and it would run out while it waited."""
        if len(lease.inflight) < lease.slots:
            return True
        if self.options.task_timeout is not None:
            return False
        return not any(other.credits > 0 and len(other.inflight) < other.slots and other.need == lease.need
                       for other in self.leases)

    def starving_other(self, need: Need) -> bool:
        """Has work of another need no lease at all? (Then an idle lease of ``need`` ends at once.)"""
        return any(other != need and not any(lease.need == other for lease in self.leases)
                   for other in self.pending.needs())

    def feeding(self, lease: LeaseState) -> str:
        """What a lease's feeder with nothing to send does: END the lease, WAIT for a change, or wait IDLE
        (the lease ends after lease_idle seconds of it)."""
        if not lease.inflight and (self.closing or lease.stuck):  # stuck: what is left needs packages it lacks
            return END
        if lease.inflight or self.pending.count(lease.need):
            return WAIT
        if self.starving_other(lease.need):  # our own work of another need waits for these slots
            return END
        return IDLE

    def lease_ended(self, lease: LeaseState, reason: str | None, dialed: bool, stamp: str, now: float) -> list[Action]:
        """The lease is over; ``reason``: why, if its worker was lost (None: in good order).  What it still
        held runs elsewhere, up to max_retries losses per task."""
        self.leases.remove(lease)
        done = self._requeue(lease, reason, stamp)
        if dialed:  # after a failed dial, wait for the backoff rather than asking again at once
            self.ask_soon(lease.need)
        done.append(WAKE)
        done.extend(self.maybe_request(now))
        return done

    def _requeue(self, lease: LeaseState, reason: str | None, stamp: str) -> list[Action]:
        lost = sorted(lease.inflight.values(), key=lambda i: i.id, reverse=True)
        lease.inflight.clear()
        done: list[Action] = []
        for item in lost:
            if item.future.done():  # interrupted: nothing to run again
                continue
            if self._cancel_queued:
                done.append(Cancel(item))
                continue
            if reason is None and not self.closing:  # sent as the worker ended the lease: not a loss
                self.pending.appendleft(item)
                continue
            item.losses.append(f"{lease.label} at {stamp} ({reason or 'lease ended'})")
            if self.closing:
                done.append(Fail(item, RuntimeError("the executor shut down while this task ran")))
            elif len(item.losses) > self.options.max_retries:
                done.append(Fail(item, WorkerLostError(
                    f"task lost with its worker {len(item.losses)} times: " + "; ".join(item.losses))))
            else:
                self.pending.appendleft(item)
        return done

    def returned(self, lease: LeaseState, task_id: int) -> list[Action]:
        """A stopping worker returned a task it never started: it grants no more; the task runs elsewhere."""
        lease.credits = 0
        return self._hand_back(lease.answered(task_id))

    def slots_taken(self, lease: LeaseState, slots: int, now: float) -> list[Action]:
        """The worker gave slots of ``lease`` to a more deserving request; ``slots`` are left: tasks queue there
        only once the other leases' slots are busy, and the board is asked for the slots still wanted."""
        if not 1 <= slots < lease.slots:
            raise ProtocolError(f"worker {lease.label} said its lease of {lease.slots} slot(s) has {slots} now")
        given, lease.slots = lease.slots - slots, slots
        log.info("worker %s gave %d of our slots to another member or client; %d left", lease.label, given, slots)
        return self.maybe_request(now)

    def missing(self, lease: LeaseState, task_id: int, module: str, now: float) -> list[Action]:
        """The worker could not import ``module`` for the task: it and its like run elsewhere."""
        if not module.isidentifier():  # (checked first: the task stays held, and runs elsewhere once the lease ends)
            raise ProtocolError(f"worker {lease.label} said task {task_id} needs module {module!r}")
        item = lease.answered(task_id)
        log.info("worker %s lacks module %s: its tasks that need it run elsewhere", lease.label, module)
        self.fitting.lacks(lease.peer, lease.worker, module, now)
        item.env = item.env.with_module(module)
        return self._hand_back(item)

    def uncached(self, lease: LeaseState, task_id: int, said: list[bytes]) -> list[Action]:
        """The worker no longer holds values the task uses: it goes again, with every value it uses."""
        item = lease.answered(task_id)
        self.sent_values(lease.peer).uncached(said, [v.digest for v in item.values], item.sent_with)
        self.tally.values_missed += len(said)
        item.uncached = True
        log.debug("worker %s no longer holds %d value(s) of task %d: sending them again", lease.label,
                  len(said), task_id)
        return self._hand_back(item)

    def _hand_back(self, item: WorkItem) -> list[Action]:
        """A task its worker gave back unstarted runs elsewhere (no loss), unless queued work is withdrawn."""
        if item.future.done():  # interrupted meanwhile
            return []
        if self._cancel_queued:
            return [Cancel(item)]
        self.pending.appendleft(item)
        return []

    # -- cancelling ----------------------------------------------------------------------
    def interrupt(self, future: Future[Any]) -> list[Action]:
        """Cancel a pending ``future`` wherever its task is; a task sent is stopped on its worker."""
        for lease in self.leases:
            for item in lease.inflight.values():
                if item.future is future:
                    log.info("interrupting task %d on worker %s", item.id, lease.label)
                    return [self.ask_cancel(lease, item, Op.INTERRUPT), Cancel(item)]
        for item in self.pending:
            if item.future is future:
                self.pending.remove(item)
                return [Cancel(item)]
        raise ValueError("interrupt() needs a pending future returned by this executor's submit()")

    def interrupt_all(self) -> list[Action]:
        """Ctrl-C: cancel the work waiting here, and stop what was sent to workers, started or not."""
        done = self._cancel_waiting()
        queued = len(done)
        for lease in self.leases:
            for item in lease.inflight.values():
                if not item.future.done():
                    done += [self.ask_cancel(lease, item, Op.INTERRUPT), Cancel(item)]
        log.info("interrupted: cancelled %d queued task(s), stopping %d sent to workers", queued,
                 (len(done) - queued) // 2)
        return done

    def withdraw_queued(self) -> list[Action]:
        """Cancel all work that has not started, including what waits at workers (cancel_futures)."""
        done = self._cancel_waiting()
        for lease in self.leases:
            asked = [item for item in lease.inflight.values() if not item.cancel_asked]
            done += [self.ask_cancel(lease, item, Op.WITHDRAW) for item in asked]
            if asked:
                log.info("withdrawing %d task(s) from worker %s unless they started", len(asked), lease.label)
        return [*done, WAKE]

    def _cancel_waiting(self) -> list[Action]:
        """From now on work is withdrawn, not run: cancel what waits here."""
        self._cancel_queued = True
        done: list[Action] = []
        while self.pending:
            done.append(Cancel(self.pending.popleft()))
        return done

    @staticmethod
    def ask_cancel(lease: LeaseState, item: WorkItem, op: Op) -> Action:
        item.cancel_asked = True
        lease.control.append(encode_op(op, item.id))
        return WAKE

    def leaving(self, now: float) -> None:
        """shutdown() was called: from now on, waiting for workers that never come is bounded."""
        if self.timeouts.leaving_since is None:
            self.timeouts.leaving_since = now
            log.debug("shutting down: %d task(s) queued, %d at workers", len(self.pending), self.inflight())

    def close(self, now: float) -> list[Action]:
        """The executor is done: leases end as they empty, requests are withdrawn."""
        self.closing = True
        return [*self.maybe_request(now), WAKE]

    def fail_all(self, error: BaseException) -> list[Action]:
        """Fail every task not finished, queued or sent."""
        done = self.fail_pending(error)
        for lease in self.leases:
            done += [Fail(item, error) for item in lease.inflight.values()]
        return done

    def fail_pending(self, error: BaseException) -> list[Action]:
        """Fail the work not sent yet."""
        done: list[Action] = []
        for need in self.pending.needs():
            while (item := self.pending.take(need)) is not None:
                done += fail_waiting(item, error)
        return done

    # -- the clock -----------------------------------------------------------------------
    def tick(self, now: float) -> list[Action]:
        """Every TICK: ask again, and what the clock decides (:class:`~.client_timeouts.Timeouts`)."""
        return self.maybe_request(now) + self.timeouts.tick(self, now)

    def stats(self) -> ExecutorStats:
        """A snapshot of the counts."""
        running: dict[tuple[str, str, str], int] = {}
        for lease in self.leases:
            key = (lease.worker, lease.peer, lease.machine)
            running[key] = running.get(key, 0) + len(lease.inflight)
        return self.tally.snapshot(len(self.pending), running)

