"""The client side on trio: find workers on the board, lease them, feed them tasks.

Board traffic grows with leases, not tasks: once a worker's offer is
accepted, tasks and results flow over one encrypted libp2p stream, as far
as the worker's credits allow, until the client runs out of work for
``lease_idle`` seconds, the worker yields the lease to a waiting client, or
the executor shuts down.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import nacl.bindings as sodium
import trio

from .board.client import BoardSession
from .client_lease import Lease
from .errors import NoWorkersError, ProtocolError, WorkerLostError
from .fitting import NOTHING, Fitting, TaskEnv
from .keys import Identity
from .pending import Pending
from .protocol import messages
from .protocol.frames import MAX_MESSAGE, Buffer, Op, encode_op, nbytes
from .protocol.lease import SILENCE_SECONDS
from .protocol.matching import python_compatible, should_request, slots_to_accept, slots_wanted
from .protocol.observers import AnswerObservers
from .protocol.reach import DialBackoff, announced_relays
from .protocol.resources import ANY, Need, Resources, unmet
from .protocol.unusable import Sighting, Unusable, describe
from .protocol.values import SentValues
from .results import UntrustedResultError
from .stats import ExecutorStats, Tally
from .stdlib_private import cancel_running
from .tasks import Value, load_outcome
from .transport.host import Libp2pHost
from .transport.nat import NatTraversal

log = logging.getLogger("p2pexec.client")

PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
REQUEST_TTL = 10.0
SCHEDULER_SKIPS = frozenset({"request", "withdraw"})  # other clients' asking: :meth:`on_message` never reads it
REQUEST_EVERY = 2.0
PROBE_SLOTS = 4096  # a request that asks every worker for all it has, to count slots
REWARN_AT_MOST_EVERY = 5.0  # the no-worker warning repeats only when its news changed, at most this often
REMEMBER_WORKERS = 90.0  # a worker not heard from for this long (hello every 30 s) is not online
HOPELESS_AFTER = 3.0  # a task lacking packages everywhere fails only after this long (the last hellos arrive)
TICK = 0.25
SKIP_AT_MOST = 64  # tasks a lease passes over (their packages are missing there) before it waits
MAX_PEERS_REMEMBERED = 1024  # workers whose held values we track; a forgotten one is sent them again


@dataclass(eq=False)
class WorkItem:
    future: Future[Any]
    payload: list[Buffer]
    id: int
    started: bool = False
    losses: list[str] = field(default_factory=list)
    size: int = 0
    cancel_asked: bool = False  # a WITHDRAW or INTERRUPT went to its worker
    deadline: float = math.inf  # with task_timeout: when it is interrupted, then when its worker must have
                                # answered the interrupt (monotonic)
    ran_on: tuple[str, str] | None = None  # (member, peer) of the worker it was last sent to, for stats
    need: Need = ANY  # what its slot must have (ex.options / resources=)
    env: TaskEnv = NOTHING  # the installed packages it refers to
    since: float = field(default_factory=time.monotonic)  # when it was queued
    values: tuple[Value, ...] = ()  # the big values its payload refers to, sent beside it (protocol/values.py)
    sent_with: tuple[bytes, ...] = ()  # the digests of those sent with it last time
    uncached: bool = False  # a worker sent it back for lack of a value: it goes with all its values next

    def __post_init__(self) -> None:
        self.size = sum(nbytes(p) for p in self.payload)


async def _fail(exc: BaseException) -> None:
    """Started in a lease's nursery to end the lease with ``exc``."""
    raise exc


@dataclass
class SchedulerOptions:
    max_workers: int
    max_retries: int = 2
    lease_idle: float = 10.0
    warn_after: float = 30.0
    worker_timeout: float | None = None
    shutdown_timeout: float | None = 60.0  # once shutting down, fail the work no worker took for this long
    board_hint: str = ""
    relays: tuple[str, ...] = ()
    allow: frozenset[str] | None = None  # use only workers run by these members
    max_result_size: int = MAX_MESSAGE  # a bigger result (or claim of one) fails its future
    trusted_results: bool = False  # unpickle results without the allow-list (workers may run code here)
    result_types: frozenset[str] = frozenset()  # "module.name" entries added to the allow-list
    task_timeout: float | None = None  # interrupt a task running longer, failing it with TimeoutError
    strict_versions: bool = True  # a worker with another major version of a package a task uses is skipped


@dataclass
class _Ask:
    """The board conversation for one need: its own request id, and when we last asked for how many."""

    req: str
    last_request: float = -1e9
    last_asked: int = 0


class ClientScheduler:
    """Owns the queue of work items, the leases and the board conversation."""

    def __init__(self, identity: Identity, cluster: str, options: SchedulerOptions) -> None:
        self.identity = identity
        self.cluster = cluster
        self.options = options
        self.request_id = messages.new_id()
        self.pending: Pending[WorkItem] = Pending()  # appended by submitting threads
        self.task_packages: set[str] = set()  # installed packages of submitted functions: their classes may return
        self.wakeup_pending = False  # set by submitters, cleared by wake() on the loop
        self.leases: list[Lease] = []
        self.offered: dict[str, tuple[int, float]] = {}  # peer -> slots it offered us last, and when
        self.capacity_known = threading.Event()  # set by each usable offer
        self.board: BoardSession | None = None
        self.host: Libp2pHost | None = None
        self.kx_keys = sodium.crypto_kx_keypair()  # ours for every lease: (public, secret)
        self._ids = itertools.count(1)
        self._changed = trio.Event()
        self._observers = AnswerObservers()
        self._nursery: trio.Nursery | None = None
        self.closing = False
        self._asks: dict[Need, _Ask] = {ANY: _Ask(self.request_id)}  # one request id per need
        self._starving_since: float | None = None
        self._warned: frozenset[Sighting] | None = None  # what the last no-worker warning said, this episode
        self._warned_at = -1e9
        self._unusable = Unusable(PYTHON)  # workers online that we cannot use, and why
        self._leaving_since: float | None = None  # when shutdown() was called
        self._cancel_queued = False  # shutdown(cancel_futures=True): queued work is withdrawn, not run
        self.banned: dict[str, str] = {}  # member -> how a worker of theirs broke the protocol
        self.nat: NatTraversal | None = None
        self.backoff = DialBackoff()  # workers that could not be reached, by peer id
        self.unreachable: dict[str, str] = {}  # worker user -> why it could not be reached (for errors)
        self.tally = Tally()  # done and failed futures, overall and per worker
        self.fitting = Fitting(options.strict_versions)  # which workers have the packages tasks refer to
        self._workers: dict[str, tuple[str, float]] = {}  # peer -> member, when last heard: who is online
        self._sent_values: dict[str, SentValues] = {}  # peer -> the big values it should hold

    def sent_values(self, peer: str) -> SentValues:
        """What worker ``peer`` holds of our big values, as far as we know; kept across its leases."""
        sent = self._sent_values.get(peer)
        if sent is None:
            if len(self._sent_values) >= MAX_PEERS_REMEMBERED:
                del self._sent_values[next(iter(self._sent_values))]
            sent = self._sent_values[peer] = SentValues()
        return sent

    # -- called from any thread through TrioThread.call_soon -----------------------
    def next_id(self) -> int:
        return next(self._ids)

    def wake(self) -> None:
        """Called on the loop after submits; clears the flag first so no submit goes unnoticed."""
        self.wakeup_pending = False
        self.notify()
        self.maybe_request()  # demand only grows here, when a lease ends, and by the tick

    def notify(self) -> None:
        """Wake the lease feeders (runs per result: keep it cheap)."""
        self._changed.set()
        self._changed = trio.Event()

    def on_message(self, msg: messages.Message) -> None:
        """A verified board message from a member."""
        if self.board is not None and self._observers.due(msg, time.monotonic()):
            self.board.send(self.hello())
        if msg.type == "offer":
            self._on_offer(msg)
        elif msg.type == "relay" and self.nat is not None and self._nursery is not None:
            if self.nat.add_candidates(announced_relays(msg.sender, self.cluster, msg["addrs"])) \
                    and not self.nat.state.checked:
                self._nursery.start_soon(self.nat.join_any)
        elif msg.type == "hello" and msg["role"] == "worker":
            node = msg.body.get("node")
            arrived = not (isinstance(node, str) and node in self._workers)
            if not self._note_unusable(msg.sender, msg.body.get("py")) and isinstance(node, str):
                self._workers[node] = (msg.sender, time.monotonic())
            if arrived:  # a worker arrived: ask again right away (a known one keeps our request and offers when free)
                self.reannounce()
        elif msg.type == "decline" and self._need_of(msg["req"]) is not None and msg["to"] == self.identity.user:
            if msg["why"] in ("python", "worker-allow"):
                self._unusable.note(msg.sender, msg["why"], str(msg.body.get("py", "?")), time.monotonic())
            elif msg["why"] in ("resources", "requires"):
                self._unusable.note(msg.sender, msg["why"], str(msg.body.get("detail", "?")), time.monotonic())
        elif msg.type == "bye" and msg["role"] == "worker" and isinstance(msg.body.get("node"), str):
            self._workers.pop(msg["node"], None)

    def _need_of(self, req: str) -> Need | None:
        """The need whose request id is ``req``, if it is one of ours."""
        return next((need for need, ask in self._asks.items() if ask.req == req), None)

    def hello(self) -> bytes:
        return self.sign("hello", {"role": "client", "node": self.request_id, "py": PYTHON,
                                    "queued": len(self.pending), "running": self._inflight(),
                                    "done": self.tally.done, "failed": self.tally.failed,
                                    "leases": [{"worker": lease.worker, "slots": lease.slots, "path": lease.path}
                                               for lease in self.leases[:16]],
                                    "banned": {member: why[:200] for member, why in list(self.banned.items())[:8]}},
                          ttl=60)

    def ask_soon(self, need: Need) -> None:
        """Ask the board for workers of ``need`` at the next chance, not after REQUEST_EVERY."""
        self._asks[need].last_request = -1e9

    def reannounce(self) -> None:
        for ask in self._asks.values():
            ask.last_request = -1e9
        self.maybe_request()

    def interrupt(self, future: Future[Any]) -> bool:
        """Cancel ``future`` wherever its task is; a running task is stopped on its worker."""
        if future.done():
            return future.cancelled()
        for lease in self.leases:
            for item in lease.inflight.values():
                if item.future is future:
                    self._ask_cancel(lease, item, Op.INTERRUPT)
                    log.info("interrupting task %d on worker %s", item.id, lease.worker)
                    return cancel_running(future)  # whatever the worker answers now is dropped
        for item in self.pending:
            if item.future is future:
                self.pending.remove(item)
                self._cancel_unsent(item)
                return True
        raise ValueError("interrupt() needs a pending future returned by this executor's submit()")

    @staticmethod
    def _cancel_unsent(item: WorkItem) -> None:
        if item.started:  # requeued after its worker was lost: running nowhere
            cancel_running(item.future)
        elif item.future.cancel():
            item.future.set_running_or_notify_cancel()  # wait() and as_completed see it now

    def leaving(self) -> None:
        """shutdown() was called: from now on, waiting for workers that never come is bounded."""
        if self._leaving_since is None:
            self._leaving_since = time.monotonic()
            log.debug("shutting down: %d task(s) queued, %d at workers", len(self.pending), self._inflight())

    def interrupt_all(self) -> None:
        """Ctrl-C: cancel the work waiting here, and stop what was sent to workers, started or not."""
        self._cancel_queued = True
        queued = len(self.pending)
        while self.pending:
            self._cancel_unsent(self.pending.popleft())
        running = 0
        for lease in self.leases:
            for item in lease.inflight.values():
                if not item.future.done():
                    self._ask_cancel(lease, item, Op.INTERRUPT)
                    cancel_running(item.future)
                    running += 1
        log.info("interrupted: cancelled %d queued task(s), stopping %d sent to workers", queued, running)

    def withdraw_queued(self) -> None:
        """Cancel all work that has not started, including what waits at workers (cancel_futures)."""
        self._cancel_queued = True
        while self.pending:
            self._cancel_unsent(self.pending.popleft())
        for lease in self.leases:
            asked = [item for item in lease.inflight.values() if not item.cancel_asked]
            for item in asked:
                self._ask_cancel(lease, item, Op.WITHDRAW)
            if asked:
                log.info("withdrawing %d task(s) from worker %s unless they started", len(asked), lease.worker)
        self.notify()

    def _ask_cancel(self, lease: Lease, item: WorkItem, op: Op) -> None:
        item.cancel_asked = True
        lease.control.append(encode_op(op, item.id))
        self.notify()

    def stats(self) -> ExecutorStats:
        """A snapshot of the counts; call it on the loop (or once the loop is gone)."""
        running: dict[tuple[str, str], int] = {}
        for lease in self.leases:
            key = (lease.worker, lease.peer)
            running[key] = running.get(key, 0) + len(lease.inflight)
        return self.tally.snapshot(len(self.pending), running)

    # -- main -------------------------------------------------------------------------
    async def run(self, host: Libp2pHost, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.host = host
        self.nat = NatTraversal(host, self.identity, serve=False)
        self.nat.add_candidates(self.options.relays)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while not (self.closing and not self.leases):
                await trio.sleep(TICK)
                self._tick()
            nursery.cancel_scope.cancel()

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
        self.closing = True
        self.maybe_request()  # withdraws what we asked for
        self.notify()
        with trio.move_on_after(grace):
            while self.leases:
                await self.wait_change()
        if self.leases and self._nursery is not None:
            log.debug("hanging up on %d lease(s) that did not end within %g s", len(self.leases), grace)
            self._nursery.cancel_scope.cancel()
        self._fail_all(RuntimeError("the executor shut down before this task ran"))

    # -- queue helpers -----------------------------------------------------------------
    def take(self, lease: Lease) -> WorkItem | None:
        """The next task of the lease's need that its worker has the packages for; those it lacks wait."""
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
        return taken

    async def wait_change(self) -> None:
        await self._changed.wait()

    def _inflight(self) -> int:
        return sum(len(lease.inflight) for lease in self.leases)

    def _wanted(self, need: Need) -> int:
        """Slots to lease for ``need``: its work, within what max_workers leaves after the other needs' leases."""
        if self.closing:
            return 0
        mine = [lease for lease in self.leases if lease.need == need]
        others = sum(lease.slots for lease in self.leases if lease.need != need)
        return slots_wanted(self.pending.count(need), sum(len(lease.inflight) for lease in mine),
                            sum(lease.slots for lease in mine), max(0, self.options.max_workers - others))

    # -- board -------------------------------------------------------------------------
    def sign(self, mtype: str, body: dict[str, Any], ttl: float) -> bytes:
        return messages.encode(self.identity, self.cluster, mtype, body, now=time.time(), ttl=ttl)

    def _post(self, mtype: str, body: dict[str, Any], ttl: float) -> None:
        if self.board is not None:
            self.board.send(self.sign(mtype, body, ttl))

    def maybe_request(self) -> None:
        for need in self.pending.needs():
            self._asks.setdefault(need, _Ask(messages.new_id()))
        now = time.monotonic()
        view = self.nat.view.to_json() if self.nat is not None else {}
        dists = {"dists": sorted(self.fitting.asking)} if self.fitting.asking else {}
        for need, ask in self._asks.items():
            wanted = self._wanted(need)
            if not wanted:
                if ask.last_asked:  # we asked and want no more: workers stop keeping slots for us
                    self._post("withdraw", {"req": ask.req}, REQUEST_TTL)
                ask.last_asked = 0
            elif should_request(wanted, ask.last_asked, now - ask.last_request, REQUEST_EVERY):
                ask.last_request, ask.last_asked = now, wanted
                needs = {"need": need.to_json()} if need != ANY else {}
                self._post("request", {"req": ask.req, "client": self.request_id, "n": wanted, "py": PYTHON,
                                       **needs, **dists, **view}, REQUEST_TTL)

    def _note_unusable(self, worker: str, python: Any) -> bool:
        """Note why this member's worker cannot serve us, if it cannot; True then."""
        now = time.monotonic()
        if worker in self.banned:
            self._unusable.note(worker, "banned", self.banned[worker], now)
        elif self.options.allow is not None and worker not in self.options.allow:
            self._unusable.note(worker, "client-allow", "", now)
        elif isinstance(python, str) and not python_compatible(PYTHON, python):
            self._unusable.note(worker, "python", python, now)
        else:
            return False
        return True

    def _on_offer(self, msg: messages.Message) -> None:
        need = self._need_of(msg["req"])
        if need is None or msg["to"] != self.identity.user or self._nursery is None:
            return
        self._note_unusable(msg.sender, msg["py"])
        if msg.sender in self.banned:  # by member: a new peer id (a restarted worker) does not evade it
            log.debug("ignoring an offer from %s: a worker of theirs broke the protocol (%s)", msg.sender,
                      self.banned[msg.sender])
            return
        if self.options.allow is not None and msg.sender not in self.options.allow:
            log.debug("ignoring an offer from %s: not in allow=", msg.sender)
            return
        if not python_compatible(PYTHON, msg["py"]):
            log.debug("ignoring an offer from %s: Python %s, not %s", msg.sender, msg["py"], PYTHON)
            return
        if not self.backoff.ready(msg["peer"], time.monotonic()):
            log.debug("ignoring an offer from %s: it could not be reached, next try later", msg.sender)
            return
        resources = _resources_in(msg)
        if need != ANY and (resources is None or unmet(need, resources) is not None):
            log.debug("ignoring an offer from %s: it cannot meet %s", msg.sender, need)
            return
        now = time.monotonic()
        self._workers[msg["peer"]] = (msg.sender, now)
        self.fitting.heard(msg["peer"], msg.sender, msg.body.get("dists"), now)
        if not self._useful(need, msg["peer"]):
            log.debug("ignoring an offer from %s: it lacks packages our tasks use", msg.sender)
            return
        if need == ANY:
            self.offered[msg["peer"]] = (msg["slots"], now)
            self.capacity_known.set()
        slots = slots_to_accept(msg["slots"], self._wanted(need))
        if slots <= 0:
            return
        lease = Lease(self, msg.sender, msg["peer"], slots, msg.key, need)
        self.leases.append(lease)
        self._nursery.start_soon(lease.run, msg)

    def _useful(self, need: Need, peer: str) -> bool:
        """Could that worker run any of the first tasks waiting with ``need`` (or is nothing waiting)?"""
        waiting = self.pending.head(need, SKIP_AT_MOST)
        return not waiting or any(self.fitting.misfit(peer, item.env) is None for item in waiting)

    def _fail_hopeless(self, now: float) -> None:
        """Fail the waiting tasks whose packages no online worker has (every one has answered)."""
        self._workers = {p: seen for p, seen in self._workers.items() if now - seen[1] < REMEMBER_WORKERS}
        self.fitting.forget(now)
        online = [peer for peer, (member, _) in self._workers.items()
                  if member not in self.banned and (self.options.allow is None or member in self.options.allow)]
        verdicts: dict[int, Exception | None] = {}
        for need in self.pending.needs():
            for item in self.pending.head(need, SKIP_AT_MOST):
                if item.env is NOTHING or now - item.since < HOPELESS_AFTER:
                    continue
                if id(item.env) not in verdicts:
                    verdicts[id(item.env)] = self.fitting.hopeless(item.env, online, now)
                error = verdicts[id(item.env)]
                if error is not None:
                    self.pending.remove(item)
                    if item.started or item.future.set_running_or_notify_cancel():
                        self.set_exception(item, error)

    def capacity(self) -> int:
        """Slots leased now, plus those offered in the last minute by workers not leased (joblib's n_jobs=-1)."""
        now, leased = time.monotonic(), {lease.peer for lease in self.leases}
        return sum(lease.slots for lease in self.leases) + sum(
            slots for peer, (slots, when) in self.offered.items() if peer not in leased and now - when < 60)

    def probe(self) -> None:
        """Ask the cluster who has slots, leasing nothing: the offers land in :attr:`offered`."""
        view = self.nat.view.to_json() if self.nat is not None else {}
        self._post("request", {"req": self.request_id, "n": PROBE_SLOTS, "py": PYTHON, "probe": True, **view},
                   REQUEST_TTL)

    def _tick(self) -> None:
        self.maybe_request()
        now = time.monotonic()
        self._fail_hopeless(now)
        if self.options.task_timeout is not None:
            self._time_out(now)
        served = {lease.need for lease in self.leases if lease.channel is not None}
        starving = [need for need in self.pending.needs() if need not in served]
        if not starving:
            self._starving_since, self._warned = None, None
            return
        if self._starving_since is None:
            self._starving_since = now
        waited = now - self._starving_since
        if waited >= self.options.warn_after:
            news = frozenset(self._sightings(now))
            if self._warned is None or (news != self._warned and now - self._warned_at >= REWARN_AT_MOST_EVERY):
                self._warned, self._warned_at = news, now
                log.warning("no worker has run tasks%s for cluster %s in %.0f s; %s", _asking(starving),
                            self.cluster, waited, self._starving_hint())
        timeout = self.options.worker_timeout
        if timeout is not None and waited >= timeout:
            self._fail_pending(NoWorkersError(
                f"no worker of cluster {self.cluster} took this task within {timeout:g} s; {self._starving_hint()}"),
                starving)
        self._give_up_leaving(now)

    def _give_up_leaving(self, now: float) -> None:
        """shutdown() must not wait forever for workers that never come: fail what none took in time."""
        limit = self.options.shutdown_timeout
        if self._leaving_since is None or limit is None or self._starving_since is None or not self.pending:
            return
        if now - max(self._starving_since, self._leaving_since) < limit:
            return
        log.warning("shutdown: no worker of cluster %s took the %d remaining task(s) in %g s; failing them with "
                    "NoWorkersError; %s", self.cluster, len(self.pending), limit, self._starving_hint())
        self._fail_pending(NoWorkersError(
            f"the executor shut down and no worker of cluster {self.cluster} took this task in {limit:g} s "
            f"(shutdown_timeout); {self._starving_hint()}, or pass a larger shutdown_timeout="))

    def _time_out(self, now: float) -> None:
        """Tasks past task_timeout fail with TimeoutError at once; their workers are told to stop them.

        A worker that has not answered such an interrupt after :data:`SILENCE_SECONDS`
        (an honest one kills the task process at once) holds slots it will never
        free: it is dropped as broken, and the rest of its tasks run elsewhere.
        """
        for lease in self.leases:
            expired = [i for i in lease.inflight.values() if i.deadline <= now]
            for item in expired:
                if item.future.done():  # interrupted earlier, and still not answered
                    if lease.nursery is not None:
                        lease.nursery.start_soon(_fail, ProtocolError(
                            f"worker {lease.worker} did not stop task {item.id} within {SILENCE_SECONDS:g} s of "
                            f"being asked"))
                    item.deadline = math.inf
                    continue
                self.set_exception(item, TimeoutError(
                    f"the task ran longer than task_timeout={self.options.task_timeout:g} s on worker "
                    f"{lease.worker}; it was interrupted there"))
                item.deadline = now + SILENCE_SECONDS
                if not item.cancel_asked:
                    self._ask_cancel(lease, item, Op.INTERRUPT)

    def _sightings(self, now: float) -> list[Sighting]:
        return self._unusable.current(now) + [Sighting(user, "unreachable", why)
                                              for user, why in sorted(self.unreachable.items())]

    def _starving_hint(self) -> str:
        """Which workers are online but unusable, why and what to do; else the command a friend must run."""
        run = f"p2pexec-worker --cluster {self.cluster}{self.options.board_hint}"
        sightings = self._sightings(time.monotonic())
        if not sightings:
            return f"a member must run: {run}"
        relay = (". If they sit behind home routers, the board or a relay must run a relay "
                 "(p2pexec board does by default; else p2pexec relay)") if self.unreachable else ""
        return (f"workers online but unusable: {describe(sightings, PYTHON, self.identity.user)}{relay}; "
                f"or a member runs a worker this client can use: {run}")

    # -- leases ----------------------------------------------------------------------
    def starving_other(self, need: Need) -> bool:
        """Has work of another need no lease at all?"""
        return any(other != need and not any(lease.need == other for lease in self.leases)
                   for other in self.pending.needs())

    def may_send(self, lease: Lease) -> bool:
        """Fill idle slots anywhere before queueing a task behind a busy one (prefetch)."""
        if len(lease.inflight) < lease.slots:
            return True
        return not any(other.credits > 0 and len(other.inflight) < other.slots and other.need == lease.need
                       for other in self.leases)

    def resolve(self, item: WorkItem, data: memoryview) -> None:
        if item.future.done():
            return
        try:
            outcome = load_outcome(data, self.options.trusted_results, self.options.result_types, self.task_packages)
        except UntrustedResultError as exc:
            self.set_exception(item, exc)
            return
        except BaseException as exc:  # SystemExit included: a result must not end the client
            if isinstance(exc, KeyboardInterrupt):
                raise
            error = RuntimeError(f"the task's outcome could not be unpickled here: {exc!r}")
            error.__cause__ = exc
            self.set_exception(item, error)
            return
        if outcome.stdout:
            sys.stdout.write(outcome.stdout)
        if outcome.stderr:
            sys.stderr.write(outcome.stderr)
        if outcome.ok:
            item.future.set_result(outcome.value)
            self.tally.settled(True, *(item.ran_on or (None, None)))
        else:
            self.set_exception(item, outcome.value)

    def set_exception(self, item: WorkItem, exc: BaseException) -> None:
        if not item.future.done():
            item.future.set_exception(exc)
            self.tally.settled(False, *(item.ran_on or (None, None)))

    def requeue(self, lease: Lease, reason: str | None) -> None:
        """Put back what the lease still held; with a ``reason``, the worker was lost."""
        lost = sorted(lease.inflight.values(), key=lambda i: i.id, reverse=True)
        lease.inflight.clear()
        stamp = time.strftime("%H:%M:%S")
        for item in lost:
            if item.future.done():  # interrupted: nothing to run again
                continue
            if self._cancel_queued:
                cancel_running(item.future)
                continue
            if reason is None and not self.closing:  # sent as the worker ended the lease: not a loss
                self.pending.appendleft(item)
                continue
            item.losses.append(f"{lease.worker} at {stamp} ({reason or 'lease ended'})")
            if self.closing:
                self.set_exception(item, RuntimeError("the executor shut down while this task ran"))
            elif len(item.losses) > self.options.max_retries:
                self.set_exception(item, WorkerLostError(
                    f"task lost with its worker {len(item.losses)} times: " + "; ".join(item.losses)))
            else:
                self.pending.appendleft(item)

    def hand_back(self, item: WorkItem) -> None:
        """A stopping worker returned a task it never started: it runs elsewhere, and is no loss."""
        if item.future.done():  # interrupted meanwhile
            return
        if self._cancel_queued:
            cancel_running(item.future)
        else:
            self.pending.appendleft(item)

    def _fail_pending(self, exc: BaseException, needs: list[Need] | None = None) -> None:
        """Fail the work not sent yet: all of it, or that of ``needs``."""
        for need in self.pending.needs() if needs is None else needs:
            while (item := self.pending.take(need)) is not None:
                if item.started or item.future.set_running_or_notify_cancel():
                    self.set_exception(item, exc)

    def _fail_all(self, exc: BaseException) -> None:
        self._fail_pending(exc)
        for lease in self.leases:
            for item in lease.inflight.values():
                self.set_exception(item, exc)


def _resources_in(msg: messages.Message) -> Resources | None:
    """What an offer's worker advertises (None from a worker too old to say, or garbled)."""
    try:
        return Resources.from_json(msg.body.get("res"))
    except (ValueError, TypeError):
        return None


def _asking(needs: list[Need]) -> str:
    """`` asking for memory=2 GiB`` for the needs that starve, unless it is only plain tasks."""
    named = [str(need) for need in needs if need != ANY]
    return f" (tasks asking for {'; '.join(named)})" if named else ""
