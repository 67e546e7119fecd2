"""The worker daemon: offers slots on the board, serves leases over libp2p.

The daemon never unpickles anything: task payloads go, as bytes, to task
processes (:mod:`p2pexec.worker.taskproc`), and their outcomes come back as
bytes.  A peer that misbehaves loses its lease; the daemon carries on.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import nacl.bindings as sodium
import trio
from packaging.utils import canonicalize_name

from .. import environment, portability
from ..board.client import BoardSession
from ..config import Participant, physical_memory
from ..errors import ProtocolError
from ..keys import Identity
from ..protocol import messages
from ..protocol.frames import MAX_FRAME, RESUME_MAGIC, resume_frame, session_keys
from ..protocol.lease import SILENCE_SECONDS
from ..protocol.resources import Gpu, Need, Resources
from ..protocol.sharing import OFFER_HOLD
from ..protocol.observers import AnswerObservers
from ..transport.channel import FramedStream, SecureChannel
from ..protocol.reach import NetView, announced_relays
from ..protocol.values import ValueCache
from ..transport.host import Libp2pHost
from ..transport.nat import NatTraversal
from ..whereami import WORKER_ENV, describe
from . import hop
from .decisions import OFFER_TTL, Action, Decline, Grant, News, Offer, Poke, WorkerCore
from .history import History, default_path
from .lease_decisions import LeaseDecisions
from .lease_server import LeaseServer
from .privileges import prctl
from .sandbox import Sandbox
from .slots import TaskSlot, become_subreaper
from .valuecache import Blob

log = logging.getLogger("p2pexec.worker")

# The override exists so tests can start a worker that looks like another Python.
PYTHON = os.environ.get("P2PEXEC_ADVERTISE_PYTHON") or f"{sys.version_info.major}.{sys.version_info.minor}"
HELLO_EVERY = 30.0
HANDSHAKE_TIMEOUT = 10.0
MAX_HANDSHAKE_FRAME = messages.MAX_LINE_BYTES
PUNCH_GIVES_UP = 20.0  # a lease still relayed this long after it started will not be hole-punched
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

    def resources(self) -> Resources:
        """What this worker lends, as it advertises it."""
        return Resources(self.slots, os.cpu_count() or 1, self.memory or physical_memory() or 0, self.gpus,
                         self.tags, sys.platform, platform.machine(), platform.python_version(),
                         memory_capped=self.memory is not None)


@dataclass(eq=False)
class Move:
    """A live lease that may move to another stream of the same client (relayed -> direct)."""

    peer: Any  # the client's libp2p peer id: only it may resume the lease
    token: bytes  # its resume frame
    status: dict[str, Any]  # for status: client, path, slots, when it started
    stream: Any = None
    arrived: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    ran: Counter[str] = field(default_factory=Counter)  # its tasks by outcome (ok, failed, killed)


class WorkerDaemon:
    """The adapter around :class:`~.decisions.WorkerCore`: the board, the libp2p host, the task processes.

    It feeds the core what happens (board lines, accepts, leases ending, ticks) and carries out what it
    answers (:meth:`carry_out`); each lease runs in a :class:`~.lease_server.LeaseServer`.
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
        self._moves: dict[bytes, Move] = {}  # resume frame -> the live lease it may move
        self._background: trio.Nursery | None = None
        self._punch_failed = False  # a lease stayed relayed: our NAT defeats hole punching
        self.serving = False  # joined the board and offering
        self.drained = trio.Event()  # set once draining and every slot is back
        self.running = 0  # tasks running in task processes, over all leases
        self.values = ValueCache[Blob](config.cache_size)  # members' big values (protocol/values.py)

    # -- lifecycle ------------------------------------------------------------------
    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled (SIGINT/SIGTERM in :func:`main`)."""
        async with Libp2pHost(self.config.listen, nat_traversal=True, members_only=True).running() as host:
            self.host = host
            self.nat = NatTraversal(host, self.config.who.identity, serve=True)
            self.nat.add_candidates(self.config.relays)
            host.set_handler(self._handle_stream)
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
                make_hello=self._hello,
                known_hosts=self.config.known_hosts, accept_new_host_key=self.config.accept_new_host_key,
            )
            try:
                await trio.to_thread.run_sync(self.board.open)
                await self._find_relay()
                log.info("worker %s serving cluster %s with %d slot(s) on %s; peer %s listening on %s "
                         "(reachability: %s)", self.config.who.identity.user, self.config.who.cluster,
                         self.config.slots, self.config.who.board, host.peer_id, " ".join(host.addrs),
                         self.nat.state.kind)
                self.serving = True
                task_status.started()
                async with trio.open_nursery() as background:
                    self._background = background
                    background.start_soon(self.nat.keep)
                    while True:
                        await trio.sleep(HELLO_EVERY)
                        if self.board is not None:
                            self.board.send(self._hello())
                        self.core.tick(time.time())
                        self._expire_values()
            finally:
                with trio.CancelScope(shield=True):
                    await self._leave_board()
                    busy = self.core.reservations.busy
                    for slot in self.slots:
                        if slot.index not in busy:  # (a lease stops its own)
                            await slot.stop()
                    shutil.rmtree(self._scratch, ignore_errors=True)  # and what busy slots' processes left

    @property
    def draining(self) -> bool:
        """Stopping: no new leases; live ones end once their running tasks are answered."""
        return self.core.draining

    async def drain(self) -> int:
        """Stop taking work: no more offers or accepts, goodbye on the board; each lease hands back the
        tasks it has not started and ends once its running ones are answered.  Returns how many run."""
        self.carry_out(self.core.drain())
        self._check_drained()
        await self._leave_board()
        return self.running

    def _check_drained(self) -> None:
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
        if self.nat.add_candidates(relays) and not self.nat.state.checked and self._background is not None:
            self._background.start_soon(self._join_relay)

    # -- board --------------------------------------------------------------------------
    def _sign(self, mtype: str, body: dict[str, Any], ttl: float, msg_id: str | None = None) -> bytes:
        return messages.encode(self.config.who.identity, self.config.who.cluster, mtype, body, now=time.time(), ttl=ttl,
                               msg_id=msg_id)

    def _hello(self) -> bytes:
        free = self.core.hello_free(time.time())
        return self._sign("hello", {"role": "worker", "node": self.host.peer_id if self.host else "",
                                    "addrs": self.nat.addrs_for(None) if self.host else [],
                                    "reach": self._reach(),
                                    "leases": [move.status for move in list(self._moves.values())[:16]],
                                    "py": PYTHON, "slots": self.config.slots,
                                    "free": free,
                                    "res": self.resources.to_json(), "platform": sys.platform,
                                    "load": round(os.getloadavg()[0], 2) if portability.loadavg() else None,
                                    "cores": os.cpu_count() or 0, "memory": physical_memory() or 0}, ttl=60)

    def _reach(self) -> str:
        """How peers reach us, for status: ``relay-only`` once a lease stayed relayed past hole punching."""
        if not self.host:
            return "unknown"
        kind = self.nat.state.kind
        return "relay-only" if kind == "nat" and self._punch_failed else kind

    async def _watch_punch(self, move: Move, client: str) -> None:
        await trio.sleep(PUNCH_GIVES_UP)
        if move.token in self._moves and move.status["path"] == "relayed" and not self._punch_failed:
            self._punch_failed = True
            log.info("the lease for %s is still relayed after %.0f s: hole punching failed (a NAT that picks a new "
                     "port per connection?); leases stay on the relay, at its speed", client, PUNCH_GIVES_UP)

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
                                                       "py": PYTHON, "node": self.host.peer_id,
                                                       "detail": action.detail}, ttl=OFFER_TTL))
            else:
                self._send_offer(action)

    def _send_offer(self, offer: Offer) -> None:
        assert self.host is not None and self.board is not None
        request = offer.request
        self.board.send(self._sign("offer", {"req": offer.req, "to": offer.client, "slots": offer.slots, "py": PYTHON,
                                             "peer": self.host.peer_id, "res": self.resources.to_json(),
                                             "dists": _answer(request),
                                             "addrs": self.nat.addrs_for(NetView.from_json(request.body)),
                                             "kx": messages.b64(offer.kx[0])}, ttl=OFFER_TTL, msg_id=offer.id))
        if offer.party is not None and self._background is not None:
            self._background.start_soon(self._after_hold)

    async def _after_hold(self) -> None:
        """An offer not taken frees its slots for the others who wait."""
        await trio.sleep(OFFER_HOLD)
        self.carry_out(self.core.look_again(time.time()))

    # -- leases -----------------------------------------------------------------------
    async def _handle_stream(self, stream: Any) -> None:
        framed = FramedStream(stream, max_frame=MAX_HANDSHAKE_FRAME)
        grant: Grant | None = None
        move: Move | None = None
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                first = await framed.recv()
                if first is None:
                    raise ProtocolError("peer closed the stream before sending its accept")
                if first.startswith(RESUME_MAGIC):
                    return await self._resume(stream, first)
                accept = self._authenticate(first)
                grant = self.core.admit(accept, time.time())
                if grant is None:  # the offer's slots went to another accept first: a race, not an attack
                    log.debug("an accept from %s came after its offer's slots were taken; it will ask again",
                              accept.sender)
                    await framed.reset()
                    return
                offer, slots = grant.offer, [self.slots[i] for i in grant.slots]
                rx, tx = session_keys("worker", *offer.kx, messages.unb64(accept["kx"], 32))
                channel = await SecureChannel.establish(framed, rx, tx, allocate=hop.allocate)
                if self.host is not None:
                    self.host.proved(stream.muxed_conn.peer_id)  # a member's client: not a stranger any more
            framed.decoder.max_frame = MAX_FRAME
            framed.silence_limit = SILENCE_SECONDS
            status = {"client": accept.sender, "path": Libp2pHost.stream_path(stream), "slots": len(slots),
                      "started": time.time()}
            move = Move(stream.muxed_conn.peer_id, resume_frame(rx, tx, accept["offer"]), status)
            self._moves[move.token] = move
            for slot in slots:
                await slot.assign(accept.sender)
                slot.limit = grant.limit if portability.rlimits() else None
            log.info("lease for %s with %d slot(s) started (%s)", accept.sender, len(slots), status["path"])
            if status["path"] == "relayed" and self._background is not None:
                self._background.start_soon(self._watch_punch, move, accept.sender)
            self.values.lease_started(accept.sender)
            try:
                decisions = LeaseDecisions(self.core, offer.id, accept.sender, accept["req"], list(grant.slots),
                                           self.config.lease_seconds, trio.current_time())
                await self._serve_lease(channel, slots, decisions, move, accept.key)
            finally:
                self.values.lease_ended(accept.sender, time.monotonic())
                if not self.config.who.keyring.allows(accept.sender, accept.key):  # removed: forget at once
                    self.values.drop(accept.sender)
                self._expire_values()
                with trio.CancelScope(shield=True):
                    await channel.close()
        except* (ProtocolError, messages.InvalidMessage, trio.TooSlowError) as group:  # nurseries group them
            exc = group.exceptions[0]
            # an accept that reaches a stopping worker is expected, not worth a warning
            (log.debug if self.draining else log.warning)("dropped a lease stream: %s", exc or type(exc).__name__)
            await framed.reset()
        except* Exception as group:  # a bug of ours must cost one lease, not the worker
            log.error("dropped a lease stream after an unexpected error; please report it",
                      exc_info=group.exceptions[0])
            await framed.reset()
        finally:
            if move is not None:
                self._moves.pop(move.token, None)
                move.done.set()
                self._lease_ended(move)
            if grant is not None:
                self.carry_out(self.core.lease_ended(grant.offer.id, time.time()))
                self._check_drained()

    def _expire_values(self) -> None:
        """Forget the big values of members who have had no lease for a while."""
        for member in self.values.expire(time.monotonic()):
            log.info("dropped the cached values of %s (no lease for %.0f s)", member, self.values.keep)

    def _lease_ended(self, move: Move) -> None:
        """One line per lease for the friend's log: whose, how long, how many tasks and how they ended."""
        self.history.flush()
        ran = move.ran
        log.info("lease for %s ended after %.1f s: %d task(s), %d failed, %d killed", move.status["client"],
                 time.time() - move.status["started"], sum(ran.values()), ran["failed"], ran["killed"])

    async def _resume(self, stream: Any, token: bytes) -> None:
        """A client's new stream for a lease it is moving (onto a direct connection); held until the lease ends."""
        move = self._moves.get(token)
        if move is None or move.peer != stream.muxed_conn.peer_id or move.stream is not None:
            log.warning("dropped a stream that resumed no lease of its peer")
            await stream.reset()
            return
        move.stream = stream
        move.arrived.set()
        await move.done.wait()

    async def follow_move(self, channel: SecureChannel, move: Move, client: str) -> None:
        """The client sent MOVE on the old stream: answer with ours, then carry on over its new stream."""
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            await move.arrived.wait()
        if move.stream is None:
            raise ProtocolError(f"client {client} moved its lease, but no stream resumed it")
        if channel.framed.stream is move.stream:
            raise ProtocolError(f"client {client} moved its lease twice")
        await channel.move_tx(move.stream)
        channel.framed.move_rx(move.stream)
        await channel.framed.close_old()
        move.status["path"] = f"upgraded after {time.time() - move.status['started']:.1f} s"
        self._punch_failed = False
        log.info("lease for %s moved to a %s connection", client, Libp2pHost.stream_path(move.stream))

    def _authenticate(self, line: bytes) -> messages.Message:
        """The accept, its signature checked (the core checks it names an offer of ours)."""
        if self.draining:
            raise ProtocolError("an accept came while this worker is stopping; it takes no new lease")
        msg = self.inbox.receive(line, time.time())
        if msg is None:
            raise ProtocolError(f"invalid accept ({', '.join(self.inbox.dropped)})")
        return msg

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

    say_how_we_sign(config.who.identity, protect_memory())
    for line in config.sandbox.describe():
        (log.info if config.sandbox.enforced else log.warning)("sandbox: %s", line)
    if config.sandbox.layer == "landlock" and not become_subreaper():
        log.warning("sandbox: could not become a child subreaper; processes tasks start may outlive them")

    async def main() -> None:
        daemon = WorkerDaemon(config)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_leave_on_signals, daemon, nursery.cancel_scope, drain)
            if parent is not None:
                nursery.start_soon(_end_with_parent, parent, nursery.cancel_scope)
            await nursery.start(daemon.run)
            on_ready()

    trio.run(main)
    if parent is not None and leftovers is not None and os.getppid() != parent:
        # Only now: while stopping, the worker still wrote there (its history, its scratch), which would
        # bring the directory back after an earlier removal.  Each worker removes it as it ends.
        shutil.rmtree(leftovers, ignore_errors=True)


DEFAULT_KEY = Path("~/.ssh/id_ed25519")
_PR_SET_DUMPABLE = 4


def say_how_we_sign(who: Identity, memory_protected: bool) -> None:
    """The friend should know which key their worker signs with, and not lend it their everyday key."""
    log.info("worker signs as %s with %s; %s", who.user, who.where,
             "its memory is closed to other processes of this user (non-dumpable)" if memory_protected else
             "its memory could not be closed to other processes of this user")
    if who.path is not None and who.path.expanduser().resolve() == DEFAULT_KEY.expanduser().resolve():
        log.warning("this worker signs with your general-purpose SSH key %s: anyone who gets it can log in where "
                    "it does. Prefer a key of its own: ssh-keygen -t ed25519 -f ~/.ssh/p2pexec_worker, added to "
                    "the members file, then --identity ~/.ssh/p2pexec_worker", who.path)


def protect_memory() -> bool:
    """Make this process non-dumpable, so processes of the same user (its tasks among them) can neither
    ptrace it nor read ``/proc/<pid>/mem``; False where the platform cannot."""
    return prctl(_PR_SET_DUMPABLE, 0)


async def _leave_on_signals(daemon: WorkerDaemon, stop: trio.CancelScope, drain: float) -> None:
    """First SIGINT/SIGTERM: drain for up to ``drain`` s; a second one: stop now, killing running tasks."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        name = signal.Signals(await anext(signals)).name
        if not daemon.serving or drain <= 0:
            log.info("received %s; stopping", name)
            stop.cancel()
            return
        log.info("received %s; draining: no new leases, tasks not started go back to their clients", name)
        running = await daemon.drain()
        if running:
            log.warning("draining: %d task(s) running, Ctrl-C again to stop now (stopping anyway in %g s)",
                        running, drain)
        with trio.move_on_after(drain) as timer:
            async with trio.open_nursery() as race:
                race.start_soon(_then_cancel, daemon.drained.wait, race.cancel_scope)
                race.start_soon(_then_cancel, partial(anext, signals), race.cancel_scope)
        if daemon.drained.is_set():
            log.info("drained: every task was answered; stopping")
        else:
            log.warning("stopping now%s: killing %d running task(s); their clients run them elsewhere",
                        f" after {drain:g} s of draining" if timer.cancelled_caught else "", daemon.running)
        stop.cancel()


async def _then_cancel(afn: Callable[[], Any], scope: trio.CancelScope) -> None:
    """Await ``afn()``, then cancel ``scope``: the first of several waits to finish wins."""
    await afn()
    scope.cancel()


PARENT_CHECK_SECONDS = 0.2


async def _end_with_parent(parent: int, stop: trio.CancelScope) -> None:
    """Stop once process ``parent`` has ended, however it ended (SIGKILL, a notebook kernel restart).

    Its death reparents us, which ``getppid`` shows.  PR_SET_PDEATHSIG
    would fire when the *thread* that started us ends, which may be long
    before its process; a pipe's EOF would wait for every process that
    inherited its other end (anything the parent forked).  :func:`serve`
    then removes the LocalCluster's directory, which holds private keys.
    Where Linux gives a pidfd for the parent, its end wakes us (a worker
    polling five times a second cost 1% of a core with 32 on a machine);
    elsewhere we look at ``getppid``.
    """
    try:
        pidfd = os.pidfd_open(parent)  # type: ignore[attr-defined,unused-ignore]  # (Linux 5.3+)
    except (AttributeError, OSError):
        pidfd = None
    try:
        if pidfd is not None and os.getppid() == parent:
            await trio.lowlevel.wait_readable(pidfd)  # readable once it has ended
        while os.getppid() == parent:
            await trio.sleep(PARENT_CHECK_SECONDS)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    log.warning("the process that started this worker (pid %d) has ended; stopping", parent)
    stop.cancel()
