"""The client side on trio: find workers on the board, lease them, feed them tasks.

Board traffic grows with leases, not tasks: once a worker's offer is
accepted, tasks and results flow over one encrypted libp2p stream, as far
as the worker's credits allow, until the client runs out of work for
``lease_idle`` seconds, the worker yields the lease to a waiting client, or
the executor shuts down.

Every decision is :class:`~.client_core.ClientCore`'s; this adapter feeds it
what happens and carries out what it answers::

    submitting threads ──► pending ──┐             ┌──► Post ────────► board session
    board session ── on_message ─────┤             ├──► Dial ────────► Lease.run (client_lease.py)
    Lease (its answers, its end) ────┼─► ClientCore├──► Fail, Cancel ─► the futures
    the tick (every TICK s) ─────────┤             ├──► Warn ────────► the log
    executor (interrupt, shutdown) ──┘             └──► Wake ────────► the lease feeders
    Lease feeder ── take() ──► the next task; Lease receiver ── resolve() ──► a result, unpickled
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
import time
import traceback
from concurrent.futures import Future
from typing import Any

import nacl.bindings as sodium
import trio

from . import task_logs
from .board.client import BoardSession
from .client_core import ClientCore
from .client_lease import Lease
from .client_state import (
    OFFERED, SAY_HELLO, WAKE, Action, Cancel, Dial, EndLease, Fail, Post, SchedulerOptions, Warn, WorkItem,
)
from .errors import P2PExecError, ProtocolError
from .fitting import Fitting
from .keys import Identity
from .protocol import messages
from .protocol.reach import announced_relays
from .protocol.values import SentValues
from .results import HostileResultError, UntrustedResultError
from .stats import ExecutorStats
from .stdlib_private import cancel_running
from .tasks import load_outcome
from .transport.host import Libp2pHost
from .transport.nat import NatTraversal

__all__ = ["SCHEDULER_SKIPS", "ClientScheduler", "SchedulerOptions", "WorkItem"]

log = logging.getLogger("p2pexec.client")

SCHEDULER_SKIPS = frozenset({"request", "withdraw"})  # other clients' asking: :meth:`on_message` never reads it
TICK = 0.25


async def _fail(exc: BaseException) -> None:
    """Started in a lease's nursery to end the lease with ``exc``."""
    raise exc


class ClientScheduler:
    """Runs the client's core on the trio loop: the board session, the leases' I/O, the futures."""

    def __init__(self, identity: Identity, cluster: str, options: SchedulerOptions) -> None:
        self.identity = identity
        self.cluster = cluster
        self.options = options
        self.core = ClientCore(identity.user, cluster, options, Fitting(options.strict_versions))
        self.pending = self.core.pending  # appended by submitting threads
        self.fitting = self.core.fitting  # told by submitting threads which packages tasks use
        self.task_packages: set[str] = set()  # installed packages of submitted functions: their classes may return
        self.wakeup_pending = False  # set by submitters, cleared by wake() on the loop
        self.capacity_known = threading.Event()  # set by each usable offer
        self.board: BoardSession | None = None
        self.refusal: P2PExecError | None = None  # the board refuses us: see refused()
        self.host: Libp2pHost | None = None
        self.nat: NatTraversal | None = None
        self.kx_keys = sodium.crypto_kx_keypair()  # ours for every lease: (public, secret)
        self._ids = itertools.count(1)
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._leases: dict[Any, Lease] = {}  # LeaseState -> the I/O running it

    def sent_values(self, peer: str) -> SentValues:
        return self.core.sent_values(peer)

    def do(self, actions: list[Action]) -> None:
        """Carry out what the core decided."""
        for action in actions:
            if action is WAKE:
                self.notify()
            elif isinstance(action, Fail):
                self.set_exception(action.item, action.error)
            elif isinstance(action, Cancel):
                _cancel(action.item)
            elif isinstance(action, Post):
                body = action.body
                if action.mtype == "request" and self.nat is not None:
                    body = {**body, **self.nat.view.to_json()}
                self._post(action.mtype, body, action.ttl)
            elif isinstance(action, Dial):
                assert self._nursery is not None
                lease = self._leases[action.lease] = Lease(self, action.lease)
                self._nursery.start_soon(lease.run, action.offer)
            elif isinstance(action, EndLease):
                running = self._leases.get(action.lease)
                if running is not None and running.nursery is not None:
                    running.nursery.start_soon(_fail, action.error)
            elif isinstance(action, Warn):
                log.warning("%s", action.text)
            elif action is OFFERED:
                self.capacity_known.set()
            elif action is SAY_HELLO and self.board is not None:
                self.board.send(self.hello())

    # -- called from any thread through TrioThread.call_soon -----------------------
    def next_id(self) -> int:
        return next(self._ids)

    def wake(self) -> None:
        """Called on the loop after submits; clears the flag first so no submit goes unnoticed."""
        self.wakeup_pending = False
        self.notify()
        self.do(self.core.maybe_request(time.monotonic()))  # demand grows here, by the tick, and as leases end or shrink

    def notify(self) -> None:
        """Wake the lease feeders: tasks wait to be sent, or something changed for every lease."""
        for lease in self._leases.values():
            lease.woken.set()
        self._changed.set()
        self._changed = trio.Event()

    def answered(self, lease: Lease) -> None:
        """``lease`` applied a message of answers (runs per result: keep it cheap).  With tasks waiting, every
        feeder looks; otherwise only an END is news to its own (closing, or what is left needs packages its
        worker lacks): a lease falling idle is noticed by the tick (:meth:`_notice_idle`), not per answer."""
        if self.core.pending:
            self.notify()
        elif self.core.closing or lease.state.stuck:
            lease.woken.set()

    def _notice_idle(self) -> None:
        """Wake the feeders of leases that have nothing in flight, to start their idle countdown."""
        for lease in self._leases.values():
            if not lease.state.inflight and not lease.idle:
                lease.woken.set()

    async def wait_change(self) -> None:
        await self._changed.wait()

    def on_message(self, msg: messages.Message) -> None:
        """A verified board message from a member."""
        if msg.type == "relay":
            if self.nat is not None and self._nursery is not None and self.nat.add_candidates(
                    announced_relays(msg.sender, self.cluster, msg["addrs"])) and not self.nat.state.checked:
                self._nursery.start_soon(self.nat.join_any)
        elif msg.type != "offer" or self._nursery is not None:  # (no lease before run() started)
            self.do(self.core.on_message(msg, time.monotonic()))

    def hello(self) -> bytes:
        return self.sign("hello", self.core.hello_body(), ttl=60)

    def reannounce(self) -> None:
        self.do(self.core.reannounce(time.monotonic()))

    def interrupt(self, future: Future[Any]) -> bool:
        """Cancel ``future`` wherever its task is; a running task is stopped on its worker."""
        if future.done():
            return future.cancelled()
        self.do(self.core.interrupt(future))  # whatever the worker answers now is dropped
        return True

    def leaving(self) -> None:
        """shutdown() was called: from now on, waiting for workers that never come is bounded."""
        self.core.leaving(time.monotonic())

    def interrupt_all(self) -> None:
        """Ctrl-C: cancel the work waiting here, and stop what was sent to workers, started or not."""
        self.do(self.core.interrupt_all())

    def withdraw_queued(self) -> None:
        """Cancel all work that has not started, including what waits at workers (cancel_futures)."""
        self.do(self.core.withdraw_queued())

    def stats(self) -> ExecutorStats:
        """A snapshot of the counts; call it on the loop (or once the loop is gone)."""
        return self.core.stats()

    def capacity(self) -> int:
        """Slots leased now, plus those offered in the last minute by workers not leased (joblib's n_jobs=-1)."""
        return self.core.capacity(time.monotonic())

    def probe(self) -> None:
        """Ask the cluster who has slots, leasing nothing: the offers land in the core's ``offered``."""
        self.do([self.core.probe()])

    # -- main -------------------------------------------------------------------------
    async def run(self, host: Libp2pHost, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.host = host
        self.nat = NatTraversal(host, self.identity, serve=False)
        self.nat.add_candidates(self.options.relays)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while not (self.core.closing and not self.core.leases):
                await trio.sleep(TICK)
                self.do(self.core.tick(time.monotonic()))
                self._notice_idle()
            nursery.cancel_scope.cancel()
        self._nursery = None  # (a board message arriving as the host stops starts nothing)

    def board_joined(self) -> None:
        """The board session is up: learn where its relay is and how it sees us, in the background."""
        if self._nursery is not None:
            self._nursery.start_soon(self._find_relay)

    async def _find_relay(self) -> None:
        assert self.nat is not None
        if self.board is not None:
            await self.nat.ask_board(self.board)
        if self.nat.candidates:
            await self.nat.join_any()

    async def close(self, grace: float = 5.0) -> None:
        """End every lease politely, hang up on those still open after ``grace`` s; called once the executor is done."""
        self.do(self.core.close(time.monotonic()))  # withdraws what we asked for
        with trio.move_on_after(grace):
            while self.core.leases:
                await self.wait_change()
        if self.core.leases:
            log.debug("hanging up on %d lease(s) that did not end within %g s", len(self.core.leases), grace)
        if self._nursery is not None:  # run() returns now, not at its next tick
            self._nursery.cancel_scope.cancel()
        self.fail_all(RuntimeError("the executor shut down before this task ran"))

    def fail_all(self, exc: BaseException) -> None:
        """Fail every task not finished (the executor is done, or its loop died)."""
        self.do(self.core.fail_all(exc))

    def refused(self, exc: P2PExecError) -> None:
        """The board, which took us before, refuses our key (the owner removed us): this executor is done,
        as a broken ProcessPoolExecutor is; ``submit`` raises ``exc`` from now on."""
        self.refusal = exc
        self.fail_all(exc)

    def lease_ended(self, lease: Lease, reason: str | None, dialed: bool) -> None:
        """``lease`` is over (``reason``: why its worker was lost; None: in good order)."""
        del self._leases[lease.state]
        self.do(self.core.lease_ended(lease.state, reason, dialed, time.strftime("%H:%M:%S"), time.monotonic()))

    # -- board -------------------------------------------------------------------------
    def sign(self, mtype: str, body: dict[str, Any], ttl: float) -> bytes:
        return messages.encode(self.identity, self.cluster, mtype, body, now=time.time(), ttl=ttl)

    def _post(self, mtype: str, body: dict[str, Any], ttl: float) -> None:
        if self.board is not None:
            self.board.send(self.sign(mtype, body, ttl))

    # -- futures -----------------------------------------------------------------------
    def resolve(self, item: WorkItem, data: memoryview) -> None:
        if item.future.done():
            return
        try:
            outcome = load_outcome(data, self.options.trusted_results, self.options.result_types, self.task_packages)
        except HostileResultError as exc:
            self.set_exception(item, _frameless(exc))
            raise ProtocolError(f"its result for task {item.id}: {exc}") from None  # (the lease bans its member)
        except UntrustedResultError as exc:
            self.set_exception(item, _frameless(exc))
            return
        except BaseException as exc:  # SystemExit included: a result must not end the client
            if isinstance(exc, KeyboardInterrupt):
                raise
            error = RuntimeError(f"the task's outcome could not be unpickled here: {exc!r}")
            error.add_note(f"Where the {type(exc).__name__} was raised, unpickling the result here:\n"
                           + "".join(traceback.format_tb(exc.__traceback__)[1:]).rstrip())  # (code of the user's)
            error.__cause__ = _frameless(exc)
            self.set_exception(item, error)
            return
        self.replay(outcome.stdout, outcome.stderr)
        if outcome.records:  # (before the result, as its output; a handler here that fails cannot hold it up)
            member, _, machine = item.ran_on or ("?", "", "?")
            try:
                task_logs.replay(outcome.records, f"{member}/{machine}")
            except Exception:
                log.exception("handling the log records of task %d failed", item.id)
        if outcome.ok:
            item.future.set_result(outcome.value)
            self.core.tally.settled(True, *(item.ran_on or (None, None, "")))
        else:
            self.set_exception(item, outcome.value)

    @staticmethod
    def replay(stdout: str, stderr: str) -> None:
        """Print here what a task printed there."""
        if stdout:
            sys.stdout.write(stdout)
        if stderr:
            sys.stderr.write(stderr)

    def set_exception(self, item: WorkItem, exc: BaseException) -> None:
        if not item.future.done():
            item.future.set_exception(exc)
            self.core.tally.settled(False, *(item.ran_on or (None, None, "")))


def _cancel(item: WorkItem) -> None:
    """Cancel ``item``'s future: a task sent (or requeued after) is running as far as the stdlib knows."""
    if item.started:
        cancel_running(item.future)
    elif item.future.cancel():
        item.future.set_running_or_notify_cancel()  # wait() and as_completed see it now


def _frameless(exc: BaseException) -> BaseException:
    """``exc`` and what is chained to it, without their tracebacks, as a future keeps them: their frames (and
    their callers', through ``f_back``) hold the result's message, hundreds of MiB maybe."""
    chained: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while chained:
        each = chained.pop()
        if each is not None and id(each) not in seen:
            seen.add(id(each))
            each.with_traceback(None)  # (not an assignment: a frozen dataclass refuses those)
            chained += [each.__cause__, each.__context__]
    return exc
