"""The worker daemon: offers slots on the board, serves leases over libp2p.

The daemon never unpickles anything: task payloads go, as bytes, to task
processes (:mod:`p2pexec.worker.taskproc`), and their outcomes come back as
bytes.  A peer that misbehaves loses its lease; the daemon carries on.

This module is the board's side and the daemon's life: joining the board
and its relay, hellos, offers and declines.  A lease's handshake (accept,
keys, moving to a direct connection) is :mod:`.leases`'s, its I/O
:mod:`.lease_server`'s; signals and the parent's death are :mod:`.lifecycle`'s.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.bindings as sodium
import trio
from packaging.utils import canonicalize_name

from .. import environment, portability
from ..board.client import BoardSession
from ..config import Participant, physical_memory
from ..errors import P2PExecError
from ..protocol import matching, messages
from ..protocol.resources import Gpu, Need, Resources, lent_twice
from ..protocol.sharing import OFFER_HOLD
from ..protocol.observers import AnswerObservers
from ..transport.channel import SecureChannel
from ..protocol.reach import NetView, announced_relays
from ..runtime import in_thread_until_cancelled
from ..protocol.values import ValueCache
from ..transport.host import Libp2pHost
from ..transport.nat import NatTraversal
from ..whereami import WORKER_ENV, describe
from .decisions import OFFER_TTL, Action, Decline, News, Offer, Poke, WorkerCore
from .history import History, default_path
from .lease_decisions import LeaseDecisions
from .lease_server import LeaseServer
from .leases import Leases, Move
from .lifecycle import end_with_parent, leave_on_signals, protect_memory, say_how_we_sign
from .neighbours import registered
from .sandbox import Sandbox
from .slots import TaskSlot, become_subreaper
from .valuecache import Arrivals, Blob

log = logging.getLogger("p2pexec.worker")

# The overrides exist so tests can start a worker that looks like another Python, or like an older release
# (which offers to any client: it reads no revision).
PYTHON = os.environ.get("P2PEXEC_ADVERTISE_PYTHON") or f"{sys.version_info.major}.{sys.version_info.minor}"
ADVERTISED_REVISION = int(os.environ.get("P2PEXEC_ADVERTISE_REVISION") or matching.REVISION)
HELLO_EVERY = 30.0
DEFAULT_CACHE_SIZE = 1 << 30


@dataclass
class WorkerConfig:
    who: Participant
    slots: int = 1
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    allow: frozenset[str] | None = None
    known_hosts: Path = Path("~/.ssh/known_hosts")
    accept_new_host_key: bool = False
    lease_seconds: float = 30.0
    relays: tuple[str, ...] = ()  # relay multiaddrs given with --relay / P2PEXEC_RELAY (the board may add its own)
    sandbox: Sandbox = Sandbox(None)  # how task processes run (see worker/sandbox.py)
    memory: int | None = None  # bytes its tasks may use in all (--memory); None: the machine's
    gpus: tuple[Gpu, ...] = ()  # the GPUs it shares (--gpus), dealt between the slots
    tags: frozenset[str] = frozenset()  # --tag: what tasks may ask for by name
    cache_size: int = DEFAULT_CACHE_SIZE  # --cache-size: bytes of big values kept for members' next tasks
    name: str = ""  # --name: how members tell this machine from its member's others (messages.machine_name)

    def resources(self) -> Resources:
        """What this worker lends, as it advertises it."""
        return Resources(self.slots, os.cpu_count() or 1, self.memory or physical_memory() or 0, self.gpus,
                         self.tags, sys.platform, platform.machine(), platform.python_version(),
                         memory_capped=self.memory is not None)


class WorkerDaemon:
    """The adapter around :class:`~.decisions.WorkerCore`: the board, the libp2p host, the task processes.

    It feeds the core what happens (board lines, accepts, leases ending, ticks) and carries out what it
    answers (:meth:`carry_out`); its :class:`~.leases.Leases` turns a client's stream into a lease, which
    runs in a :class:`~.lease_server.LeaseServer`.
    """

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        # Lease handshakes run on trio; board lines are checked in the board's reader thread.
        self.inbox = messages.Inbox(config.who.cluster, config.who.keyring)
        self._scratch = Path(tempfile.mkdtemp(prefix="p2pexec-worker-"))  # every task process's scratch, below
        self.resources = config.resources()
        self.slots = [TaskSlot(i, config.sandbox, self._scratch) for i in range(config.slots)]
        self.core = WorkerCore(self.resources, me=config.who.identity.user, python=PYTHON, allow=config.allow,
                               requires_unmet=_requires_unmet, new_keys=sodium.crypto_kx_keypair)
        self.host: Libp2pHost | None = None
        self.board: BoardSession | None = None
        self._observers = AnswerObservers()
        self.history = History(default_path())  # what ran, for p2pexec-worker --history
        self.pokes: set[Callable[[], None]] = set()  # re-check each live lease (someone started waiting)
        self.nat: NatTraversal
        self.leases = Leases(self)  # the lease handshake, and the live leases that may move
        self.background: trio.Nursery | None = None  # for what a lease or a board line starts (while serving)
        self.serving = False  # joined the board and offering
        self.refused: P2PExecError | None = None  # the board refuses us now: the owner removed us
        self.drained = trio.Event()  # set once draining and every slot is back
        self.running = 0  # tasks running in task processes, over all leases
        self.values = ValueCache[Blob](config.cache_size)  # members' big values (protocol/values.py)
        self.arrivals = Arrivals()  # which values were stored, for tasks of other leases waiting for them

    # -- lifecycle ------------------------------------------------------------------
    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled (SIGINT/SIGTERM in :func:`main`)."""
        try:
            libp2p = Libp2pHost(self.config.listen, nat_traversal=True, members_only=True)
        except OSError as exc:
            raise P2PExecError(f"cannot listen on {', '.join(self.config.listen)}: {exc.strerror}; pick another "
                               "port with --listen (or port 0: any free one)") from None
        async with libp2p.running() as host:
            self.host = host
            self.nat = NatTraversal(host, self.config.who.identity, serve=True)
            self.nat.add_candidates(self.config.relays)
            host.set_handler(self.leases.handle_stream)
            for slot in self.slots:
                slot.env[WORKER_ENV] = describe(self.config.who.identity.user, host.peer_id, slot.index,
                                                self.resources)
                if self.config.gpus:
                    slot.env["CUDA_VISIBLE_DEVICES"] = ",".join(
                        str(gpu.index) for gpu in self.resources.gpus_of(slot.index))
            async with trio.open_nursery() as starting:  # each task process imports for ~0.1 s
                for slot in self.slots:
                    starting.start_soon(slot.start)
            token = trio.lowlevel.current_trio_token()
            self.board = BoardSession(
                self.config.who.board, self.config.who.identity, self.config.who.cluster,
                inbox=messages.Inbox(self.config.who.cluster, self.config.who.keyring,
                                     me=self.config.who.identity.user),
                on_message=lambda msg: token.run_sync_soon(self._on_message, msg),
                on_refused=lambda exc: token.run_sync_soon(self._refused, exc),
                make_hello=self._hello,
                known_hosts=self.config.known_hosts, accept_new_host_key=self.config.accept_new_host_key,
            )
            try:
                # (a board not up yet is waited for; Ctrl-C then closes it in _leave_board)
                await in_thread_until_cancelled(self.board.open, None)
                await self._find_relay()
                log.info("worker %s serving cluster %s with %d slot(s) on %s; peer %s listening on %s "
                         "(reachability: %s)", self.config.who.identity.user, self.config.who.cluster,
                         self.config.slots, self.config.who.board, host.peer_id, " ".join(host.addrs),
                         self.nat.state.kind)
                self.serving = True
                task_status.started()
                async with trio.open_nursery() as background:
                    self.background = background
                    background.start_soon(self.nat.keep)
                    while self.refused is None:
                        await trio.sleep(HELLO_EVERY)
                        if self.board is not None:
                            self.board.send(self._hello())
                        self.core.tick(time.time())
                        self.expire_values()
                raise self.refused
            finally:
                with trio.CancelScope(shield=True):
                    await self._leave_board()
                    busy = self.core.reservations.busy
                    for slot in self.slots:
                        if slot.index not in busy:  # (a lease stops its own)
                            await slot.stop()
                    shutil.rmtree(self._scratch, ignore_errors=True)  # and what busy slots' processes left

    def _refused(self, exc: BaseException) -> None:
        """The board, which took us before, refuses our key: the owner removed us.  Serving is over."""
        self.refused = P2PExecError(f"this worker stops: {exc}")
        if self.background is not None:  # (else the serving loop has not begun, and will not)
            self.background.cancel_scope.cancel()

    @property
    def draining(self) -> bool:
        """Stopping: no new leases; live ones end once their running tasks are answered."""
        return self.core.draining

    async def drain(self) -> int:
        """Stop taking work: no more offers or accepts, goodbye on the board; each lease hands back the
        tasks it has not started and ends once its running ones are answered.  Returns how many run."""
        self.carry_out(self.core.drain())
        self.check_drained()
        await self._leave_board()
        return self.running

    def check_drained(self) -> None:
        if self.core.drained:
            self.drained.set()

    async def _leave_board(self) -> None:
        """Say goodbye once, so clients and ``p2pexec status`` stop counting on this worker."""
        board, self.board = self.board, None
        if board is not None:
            bye = self._sign("bye", {"role": "worker", "node": self.host.peer_id if self.host else ""}, ttl=30)
            await trio.to_thread.run_sync(board.close, bye)

    async def _find_relay(self) -> None:
        """Join the board's relay (or a configured one) before the first offer."""
        assert self.board is not None
        await self.nat.ask_board(self.board)
        await self._join_relay()

    async def _join_relay(self) -> None:
        """Requests that come meanwhile wait, and are offered to once we know our addresses."""
        if not self.nat.candidates:
            return
        self.core.joining += 1
        try:
            await self.nat.join_any()
        finally:
            self.core.joining -= 1
            self.carry_out(self.core.look_again(time.time()))

    def _relay_announced(self, relays: list[str]) -> None:
        """The owner's relay (``p2pexec relay OWNER/NAME``), announced on a board without one of its own."""
        if self.nat.add_candidates(relays) and not self.nat.state.checked and self.background is not None:
            self.background.start_soon(self._join_relay)

    # -- board --------------------------------------------------------------------------
    def _sign(self, mtype: str, body: dict[str, Any], ttl: float, msg_id: str | None = None) -> bytes:
        return messages.encode(self.config.who.identity, self.config.who.cluster, mtype, body, now=time.time(), ttl=ttl,
                               msg_id=msg_id)

    def _hello(self) -> bytes:
        free = self.core.hello_free(time.time())
        return self._sign("hello", {"role": "worker", "node": self.host.peer_id if self.host else "",
                                    "name": self.config.name,
                                    "addrs": self.nat.addrs_for(None) if self.host else [],
                                    "reach": self._reach(),
                                    "leases": self.leases.status(),
                                    "py": PYTHON, "rev": ADVERTISED_REVISION, "slots": self.config.slots,
                                    "free": free,
                                    "res": self.resources.to_json(), "platform": sys.platform,
                                    "load": round(os.getloadavg()[0], 2) if portability.loadavg() else None,
                                    "cores": os.cpu_count() or 0, "memory": physical_memory() or 0}, ttl=60)

    def _reach(self) -> str:
        """How peers reach us, for status: ``relay-only`` once a lease stayed relayed past hole punching."""
        if not self.host:
            return "unknown"
        kind = self.nat.state.kind
        return "relay-only" if kind == "nat" and self.leases.punch_failed else kind

    def _on_message(self, msg: messages.Message) -> None:
        if self.board is not None and self._observers.due(msg, time.monotonic()):
            self.board.send(self._hello())
        if msg.type == "relay" and self.host is not None:
            self._relay_announced(announced_relays(msg.sender, self.config.who.cluster, msg["addrs"]))
        if msg.type == "withdraw":
            self.carry_out(self.core.withdraw(msg["req"], msg.sender, time.time()))
        elif msg.type == "request" and self.host is not None and self.board is not None:
            self.carry_out(self.core.request(msg, time.time()))

    def carry_out(self, actions: list[Action]) -> None:
        """Do what the core answered: poke the leases, send hellos, declines and offers."""
        for action in actions:
            if isinstance(action, Poke):
                for poke in list(self.pokes):
                    poke()
            elif self.host is None or self.board is None:
                continue  # not on the board (yet, or any more): nobody to tell
            elif isinstance(action, News):
                self.board.send(self._hello())
            elif isinstance(action, Decline):
                request = action.request
                self.board.send(self._sign("decline", {"req": request["req"], "to": request.sender, "why": action.why,
                                                       "py": PYTHON, "rev": ADVERTISED_REVISION,
                                                       "node": self.host.peer_id, "detail": action.detail},
                                            ttl=OFFER_TTL))
            else:
                self._send_offer(action)

    def _send_offer(self, offer: Offer) -> None:
        assert self.host is not None and self.board is not None
        request = offer.request
        self.board.send(self._sign("offer", {"req": offer.req, "to": offer.client, "slots": offer.slots, "py": PYTHON,
                                             "rev": ADVERTISED_REVISION,
                                             "peer": self.host.peer_id, "name": self.config.name,
                                             "res": self.resources.to_json(),
                                             "dists": _answer(request),
                                             "addrs": self.nat.addrs_for(NetView.from_json(request.body)),
                                             "kx": messages.b64(offer.kx[0])}, ttl=OFFER_TTL, msg_id=offer.id))
        if offer.party is not None and self.background is not None:
            self.background.start_soon(self._after_hold)

    async def _after_hold(self) -> None:
        """An offer not taken frees its slots for the others who wait."""
        await trio.sleep(OFFER_HOLD)
        self.carry_out(self.core.look_again(time.time()))

    # -- leases -----------------------------------------------------------------------
    def expire_values(self) -> None:
        """Forget the big values of members who have had no lease for a while."""
        for member in self.values.expire(time.monotonic()):
            log.info("dropped the cached values of %s (no lease for %.0f s)", member, self.values.keep)

    async def _serve_lease(self, channel: SecureChannel, slots: list[TaskSlot], decisions: LeaseDecisions,
                           move: Move, client_key: bytes) -> None:
        """Run the client's tasks on our slots (a test double overrides this to misbehave)."""
        await LeaseServer(self, channel, slots, decisions, move, client_key).run()


def _answer(request: messages.Message) -> dict[str, str | None]:
    """Our versions of the distributions a request asks about."""
    asked = request.body.get("dists")
    return environment.answer(asked) if isinstance(asked, list) else {}


def _requires_unmet(need: Need) -> str | None:
    """What of a need's ``requires=`` this machine lacks, and how to fix it; None if it has it all."""
    required = environment.parse_requires(need.requires)
    have = environment.answer(canonicalize_name(req.name) for req in required)
    unsatisfied = environment.misfit({}, required, have, strict=False)
    return None if unsatisfied is None else f"{unsatisfied.describe()} (to fix: {unsatisfied.fix()})"


def serve(config: WorkerConfig, on_ready: Callable[[], None] = lambda: None, *, drain: float = 30.0,
          parent: int | None = None, leftovers: Path | None = None) -> None:
    """Run a worker until SIGINT or SIGTERM; ``on_ready`` once it has joined the board.

    The first signal drains (running tasks get up to ``drain`` seconds), a
    second stops at once.  With ``parent``, the worker also stops when that
    process (a LocalCluster's) ends, and removes ``leftovers`` (its directory).
    """

    say_how_we_sign(config.who.identity, config.who.cluster, protect_memory())
    for line in config.sandbox.describe():
        (log.info if config.sandbox.enforced else log.warning)("sandbox: %s", line)
    if config.sandbox.layer != "bubblewrap" and not become_subreaper() and config.sandbox.enforced:
        log.warning("sandbox: could not become a child subreaper; processes tasks start may outlive them")

    async def main() -> None:
        daemon = WorkerDaemon(config)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(leave_on_signals, daemon, nursery.cancel_scope, drain)
            if parent is not None:
                nursery.start_soon(end_with_parent, parent, nursery.cancel_scope)
            await nursery.start(daemon.run)
            on_ready()

    # What is imported by now (libp2p's modules alone are about 100,000 objects) lives as long as we do: the
    # collector need not walk it again, and leaving takes milliseconds where the interpreter's last
    # collections over it took half a second.  (Garbage first: what is frozen is never collected.)
    gc.collect()
    gc.freeze()
    resources = config.resources()
    # (a LocalCluster's workers, which have a parent, share the machine on purpose)
    with registered(config.who.cluster, resources, enabled=parent is None) as others:
        for line in lent_twice(resources, others, physical_memory() or 0):
            log.warning("lent twice: %s", line)
        trio.run(main)
    if parent is not None and leftovers is not None and os.getppid() != parent:
        # Only now: while stopping, the worker still wrote there (its history, its scratch), which would
        # bring the directory back after an earlier removal.  Each worker removes it as it ends.
        shutil.rmtree(leftovers, ignore_errors=True)
