"""The worker daemon: offers slots on the board, serves leases over libp2p.

The daemon never unpickles anything: task payloads go, as bytes, to task
processes (:mod:`p2pexec.worker.taskproc`), and their outcomes come back as
bytes.  A peer that misbehaves loses its lease; the daemon carries on.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
from ..protocol.frames import (
    MAX_FRAME, RESUME_MAGIC, Buffer, Op, decode_ops, encode_op, op_parts, resume_frame, session_keys,
)
from ..protocol.lease import HEARTBEAT_SECONDS, SILENCE_SECONDS, CreditLedger
from ..protocol.matching import credit_window, python_compatible, slots_to_offer
from ..protocol.resources import ANY, Gpu, Need, Reservations, Resources, unmet
from ..protocol.sharing import OFFER_HOLD, Party, Sharing, Want
from ..protocol.observers import AnswerObservers
from ..transport.channel import FramedStream, SecureChannel
from ..protocol.reach import NetView, announced_relays
from ..protocol.unusable import DeclineLimiter
from ..protocol.values import ValueCache
from ..transport.host import Libp2pHost
from ..transport.nat import NatTraversal
from ..whereami import WORKER_ENV, describe
from . import hop
from .history import Entry, History, default_path
from .privileges import prctl
from .sandbox import Sandbox
from .slots import TaskProcessDied, TaskSlot, become_subreaper
from .valuecache import Blob, LeaseBlobs

log = logging.getLogger("p2pexec.worker")

# The override exists so tests can start a worker that looks like another Python.
PYTHON = os.environ.get("P2PEXEC_ADVERTISE_PYTHON") or f"{sys.version_info.major}.{sys.version_info.minor}"
OFFER_TTL = 15.0
HELLO_EVERY = 30.0
HELLO_NEWS_EVERY = 1.0  # a hello when a request finds us busy (or free) unlike our last hello said, at most this often
HANDSHAKE_TIMEOUT = 10.0
MAX_HANDSHAKE_FRAME = messages.MAX_LINE_BYTES
# A lease is idle once no task came this long after its last answer: a long task's next one comes only
# after the client has the answer and the credit, a round trip of up to a few hundred ms.
IDLE_GRACE = 0.5
# Short tasks queued behind a running one: their answers are held this long at most (and at most GATHER_OPS
# of them), so that several leave in one message, with one credit; a message costs both ends far more
# than an answer does (libp2p, Noise, yamux).  A lone task's answer, or a long task's, is never held.
GATHER_SECONDS = 0.001
GATHER_OPS = 64  # buffers in the outbox (an answer is one or two)
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


Task = tuple[int, memoryview, "tuple[int, int] | None", list[Blob]]  # id, payload, (memfd, offset) if shared, values


@dataclass(eq=False)
class _Move:
    """A live lease that may move to another stream of the same client (relayed -> direct)."""

    peer: Any  # the client's libp2p peer id: only it may resume the lease
    token: bytes  # its resume frame
    status: dict[str, Any]  # for status: client, path, slots, when it started
    stream: Any = None
    arrived: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    ran: Counter[str] = field(default_factory=Counter)  # its tasks by outcome (ok, failed, killed)


@dataclass
class _Ran:
    """One task as the history records it; ``outcome`` stays ``killed`` unless the task answers."""

    start: float  # Unix time
    clock: float  # trio.current_time() at the start
    outcome: str = "killed"


@dataclass
class Offer:
    id: str
    req: str
    client: str
    slots: int
    exp: float
    kx: tuple[bytes, bytes]  # this offer's own X25519 key pair: one lease's keys reveal no other's
    need: Need = ANY  # what the request asked of each slot
    party: Party | None = None  # whose request it answers (None: a probe, which holds no slots)


class WorkerDaemon:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        # Lease handshakes run on trio; board lines are checked in the board's reader thread.
        self.inbox = messages.Inbox(config.who.cluster, config.who.keyring)
        self._scratch = Path(tempfile.mkdtemp(prefix="p2pexec-worker-"))  # every task process's scratch, below
        self.resources = config.resources()
        self.slots = [TaskSlot(i, config.sandbox, self._scratch) for i in range(config.slots)]
        self.reservations = Reservations(self.resources)  # which slots, memory and cores each lease holds
        self.offers: dict[str, Offer] = {}
        self.host: Libp2pHost | None = None
        self.board: BoardSession | None = None
        self._observers = AnswerObservers()
        self._declines = DeclineLimiter()
        self.history = History(default_path())  # what ran, for p2pexec-worker --history
        self.sharing = Sharing(messages.new_id())  # who waits for our slots, who holds them (fair sharing)
        self._pokes: set[Callable[[], None]] = set()  # re-check each live lease (someone started waiting)
        self.nat: NatTraversal
        self._moves: dict[bytes, _Move] = {}  # resume frame -> the live lease it may move
        self._background: trio.Nursery | None = None
        self._punch_failed = False  # a lease stayed relayed: our NAT defeats hole punching
        self._joining = 0  # relay joins under way: requests wait for them, so offers carry addresses that work
        self._said_free = (True, -1e9)  # whether our last hello said we had free slots, and when (monotonic)
        self.serving = False  # joined the board and offering
        self.draining = False  # stopping: no new leases; live ones end once their running tasks are answered
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
                        now = time.time()
                        self.offers = {k: o for k, o in self.offers.items() if o.exp > now}
                        self.sharing.expire(now)
                        self._expire_values()
            finally:
                with trio.CancelScope(shield=True):
                    await self._leave_board()
                    busy = self.reservations.busy
                    for slot in self.slots:
                        if slot.index not in busy:  # (a lease stops its own)
                            await slot.stop()
                    shutil.rmtree(self._scratch, ignore_errors=True)  # and what busy slots' processes left

    async def drain(self) -> int:
        """Stop taking work: no more offers or accepts, goodbye on the board; each lease hands back the
        tasks it has not started and ends once its running ones are answered.  Returns how many run."""
        self.draining = True
        self.offers.clear()
        self.sharing.waiting.clear()
        for poke in list(self._pokes):
            poke()
        self._check_drained()
        await self._leave_board()
        return self.running

    def _check_drained(self) -> None:
        if self.draining and not self.reservations.busy:
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
        self._joining += 1
        try:
            await self.nat.join_any()
        finally:
            self._joining -= 1
            self._offer_to_waiting()

    def _relay_announced(self, relays: list[str]) -> None:
        """The owner's relay (``p2pexec relay OWNER/NAME``), announced on a board without one of its own."""
        if self.nat.add_candidates(relays) and not self.nat.state.checked and self._background is not None:
            self._background.start_soon(self._join_relay)

    # -- board --------------------------------------------------------------------------
    def _sign(self, mtype: str, body: dict[str, Any], ttl: float) -> bytes:
        return messages.encode(self.config.who.identity, self.config.who.cluster, mtype, body, now=time.time(), ttl=ttl)

    def _hello(self) -> bytes:
        free = self.config.slots - len(self.reservations.busy)
        self._said_free = (free > 0, time.monotonic())  # our board sends requests to free workers first
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

    async def _watch_punch(self, move: _Move, client: str) -> None:
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
            self.sharing.withdraw(msg["req"], msg.sender)
            return self._offer_to_waiting()
        if msg.type != "request" or self.host is None or self.board is None:
            return
        if self.config.allow is not None and msg.sender not in self.config.allow:
            log.debug("ignoring a request from %s: not in --allow", msg.sender)
            return self._decline(msg, "worker-allow")
        if not python_compatible(PYTHON, msg["py"]):
            return self._decline(msg, "python")
        try:
            need = _need_in(msg)
        except (ValueError, TypeError) as exc:
            log.debug("ignoring a request from %s with a bad resource need: %s", msg.sender, exc)
            return None
        why_not = unmet(need, self.resources)
        if why_not is not None:
            return self._decline(msg, "resources", f"{why_not}; it lends {self.resources.describe()}")
        required = environment.parse_requires(need.requires)
        have = environment.answer(canonicalize_name(req.name) for req in required)
        unsatisfied = environment.misfit({}, required, have, strict=False)
        if unsatisfied is not None:
            return self._decline(msg, "requires", f"{unsatisfied.describe()} (to fix: {unsatisfied.fix()})")
        if msg.body.get("probe") is True:  # a client counting slots (joblib's n_jobs=-1): offer what is free, no more
            if not self._joining:
                self._offer(msg, self.reservations.available(need), None)
            return
        self.sharing.wait(Want(msg["req"], _party(msg), max(1, msg["n"]), msg.exp, msg))
        if not self._joining:  # else they wait for the relay: offers must carry addresses that work
            self._offer_to_waiting()
        if msg["req"] in self.sharing.waiting:
            for poke in list(self._pokes):  # a lease may owe it a slot (fair sharing)
                poke()

    def _tell_news(self) -> None:
        """A hello when our slots turned from all busy to some free, or back, unlike our last hello said (at
        most once a second): our board sends requests to the workers that last said they were free."""
        now = time.monotonic()
        if self.board is not None and now - self._said_free[1] >= HELLO_NEWS_EVERY \
                and (self.config.slots > len(self.reservations.busy)) != self._said_free[0]:
            self.board.send(self._hello())

    def _decline(self, request: messages.Message, why: str, detail: str = "") -> None:
        """Tell a client we will not serve it, so its no-worker warning can say why (rate-limited)."""
        assert self.board is not None and self.host is not None
        if self._declines.due(request["req"], time.monotonic()):
            self.board.send(self._sign("decline", {"req": request["req"], "to": request.sender, "why": why,
                                                   "py": PYTHON, "node": self.host.peer_id, "detail": detail[:1000]},
                                       ttl=OFFER_TTL))

    def _offer(self, request: messages.Message, slots: int, party: Party | None) -> str | None:
        """Offer ``slots`` slots to a request; the offer's id, or None if there are none to offer."""
        assert self.host is not None and self.board is not None
        slots = slots_to_offer(slots, request["n"])
        if slots <= 0:
            return None
        kx = sodium.crypto_kx_keypair()
        line_out = self._sign("offer", {"req": request["req"], "to": request.sender, "slots": slots, "py": PYTHON,
                                        "peer": self.host.peer_id, "res": self.resources.to_json(),
                                        "dists": _answer(request),
                                        "addrs": self.nat.addrs_for(NetView.from_json(request.body)),
                                        "kx": messages.b64(kx[0])}, ttl=OFFER_TTL)
        offer_id = messages.decode(line_out).id
        self.offers[offer_id] = Offer(offer_id, request["req"], request.sender, slots, time.time() + OFFER_TTL, kx,
                                      _need_in(request), party)
        self.board.send(line_out)
        return offer_id

    def _offer_to_waiting(self, owed: Want | None = None) -> None:
        """Offer what is free to the waiting requests, one slot at a time to the most deserving
        (see :mod:`p2pexec.protocol.sharing`), first a slot to ``owed`` if a lease just gave it one;
        an offer holds its slots for a few seconds."""
        if self.host is None or self.board is None or self.draining:
            return
        self._tell_news()  # (called whenever slots may have come free)
        now = time.time()
        self.sharing.expire(now)
        promised = self.sharing.offered_slots(now)
        given = [(owed, 1)] if owed is not None else []
        for want, slots in given + self.sharing.allocate(
                lambda w: self.reservations.available(_need_in(w.request)) - promised - len(given), now):
            offer_id = self._offer(want.request, slots, want.party)
            if offer_id is not None:
                self.sharing.offered(offer_id, want, slots, now)
                if self._background is not None:
                    self._background.start_soon(self._after_hold)

    async def _after_hold(self) -> None:
        """An offer not taken frees its slots for the others who wait."""
        await trio.sleep(OFFER_HOLD)
        self._offer_to_waiting()

    # -- leases -----------------------------------------------------------------------
    async def _handle_stream(self, stream: Any) -> None:
        framed = FramedStream(stream, max_frame=MAX_HANDSHAKE_FRAME)
        slots: list[TaskSlot] = []
        move: _Move | None = None
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                first = await framed.recv()
                if first is None:
                    raise ProtocolError("peer closed the stream before sending its accept")
                if first.startswith(RESUME_MAGIC):
                    return await self._resume(stream, first)
                accept = self._authenticate(first)
                offer = self.offers.pop(accept["offer"])
                self.sharing.ended(offer.id, time.time())  # its hold: the reservation below holds what it takes
                count = min(accept["slots"], offer.slots, self.reservations.available(offer.need))
                held = self.reservations.reserve(offer.id, offer.need, count) if count > 0 else None
                slots = [self.slots[i] for i in held or ()]
                if slots:
                    self.sharing.leased(offer.id, offer.req, offer.party or Party(accept.sender, offer.req),
                                        len(slots), time.time())
                else:  # the offer's slots went to another accept first: a race, not an attack
                    log.debug("an accept from %s came after its offer's slots were taken; it will ask again",
                              accept.sender)
                    await framed.reset()
                    return
                rx, tx = session_keys("worker", *offer.kx, messages.unb64(accept["kx"], 32))
                channel = await SecureChannel.establish(framed, rx, tx, allocate=hop.allocate)
                if self.host is not None:
                    self.host.proved(stream.muxed_conn.peer_id)  # a member's client: not a stranger any more
            framed.decoder.max_frame = MAX_FRAME
            framed.silence_limit = SILENCE_SECONDS
            status = {"client": accept.sender, "path": Libp2pHost.stream_path(stream), "slots": len(slots),
                      "started": time.time()}
            move = _Move(stream.muxed_conn.peer_id, resume_frame(rx, tx, accept["offer"]), status)
            self._moves[move.token] = move
            for slot in slots:
                await slot.assign(accept.sender)
                slot.limit = self.reservations.limit_of(offer.need) if portability.rlimits() else None
            log.info("lease for %s with %d slot(s) started (%s)", accept.sender, len(slots), status["path"])
            if status["path"] == "relayed" and self._background is not None:
                self._background.start_soon(self._watch_punch, move, accept.sender)
            self.values.lease_started(accept.sender)
            try:
                await self._serve_lease(channel, slots, accept.sender, accept["req"], accept["offer"], move,
                                        accept.key)
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
            if slots:
                self.reservations.release(accept["offer"])
                self.sharing.ended(accept["offer"], time.time())
                self._offer_to_waiting()
                self._check_drained()

    def _expire_values(self) -> None:
        """Forget the big values of members who have had no lease for a while."""
        for member in self.values.expire(time.monotonic()):
            log.info("dropped the cached values of %s (no lease for %.0f s)", member, self.values.keep)

    @contextmanager
    def _recording(self, move: _Move, slot: TaskSlot, member: str) -> Iterator[_Ran]:
        """Count the task in its lease and record it in the history, however it ends."""
        ran = _Ran(time.time(), trio.current_time())
        try:
            yield ran
        finally:
            move.ran[ran.outcome] += 1
            self.history.add(Entry(member, slot.function, ran.start, trio.current_time() - ran.clock, ran.outcome,
                                   self.config.who.cluster))

    def _lease_ended(self, move: _Move) -> None:
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

    async def _follow_move(self, channel: SecureChannel, move: _Move, client: str) -> None:
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
        if self.draining:
            raise ProtocolError("an accept came while this worker is stopping; it takes no new lease")
        msg = self.inbox.receive(line, time.time())
        if msg is None:
            raise ProtocolError(f"invalid accept ({', '.join(self.inbox.dropped)})")
        offer = self.offers.get(msg["offer"]) if msg.type == "accept" else None
        if offer is None or msg["worker"] != self.config.who.identity.user or offer.client != msg.sender:
            raise ProtocolError(f"{msg.sender} sent an accept for no offer of ours")
        if self.config.allow is not None and msg.sender not in self.config.allow:
            raise ProtocolError(f"{msg.sender} is not in --allow")
        return msg

    async def _serve_lease(self, channel: SecureChannel, slots: list[TaskSlot], client: str, req: str,
                           lease: str, move: _Move, client_key: bytes) -> None:
        """Run the client's tasks on our slots; the client may only send what we credited.

        Fair sharing (:mod:`p2pexec.protocol.sharing`): a slot owed to a more
        deserving request leaves the lease between two tasks; the last one
        hands back the tasks not started and ends the lease once its running
        task is answered.  A lease older than ``lease_seconds`` that another
        client (or another need of the same client) is waiting for gets no
        more credit; once it has answered what it holds, it ends, and the
        slots go to whoever waited.  So does one that falls idle after its
        work while someone waits.  A worker that is stopping
        (:meth:`drain`) grants no more credit either, hands back the tasks it
        has not started (RETURNED: the client runs them elsewhere), and ends
        the lease once its running tasks are answered.

        Answers go to an outbox that one sender drains: whatever finished
        while the previous message was being written leaves in the next one,
        with the credit that refills the client's window.  That sender also
        writes the final END, so no write is ever cancelled halfway.
        """
        ledger = CreditLedger(len(slots))
        blobs = LeaseBlobs(self.values, client)
        send_tasks, receive_tasks = trio.open_memory_channel[Task](math.inf)
        outbox: list[Buffer] = []
        mail = trio.Event()
        finished = False

        def post(*op: Buffer) -> None:
            outbox.extend(op)
            mail.set()

        started = answered_at = trio.current_time()  # (answered_at: when a task was last answered)
        looking_again = False
        gave_way = False
        stoppers: dict[int, trio.CancelScope] = {}  # running task id -> what interrupts it
        idle: set[trio.CancelScope] = set()  # slots waiting for a task: a poke makes them look up

        def poke() -> None:
            """Someone started waiting: check whether they are owed a slot, busy or idle."""
            post()
            for scope in list(idle):
                scope.cancel()

        def leaves(slot: TaskSlot) -> bool:
            """Between two tasks: does this slot go to a more deserving request?  (The last slot stays,
            and the lease ends instead: see ``giving_way``.)"""
            owed = None if finished or len(slots) < 2 else self.sharing.owed(lease, time.time())
            if owed is None:
                return False
            slots.remove(slot)
            ledger.shrink()
            self.reservations.release_slot(lease, slot.index)
            self.sharing.shrunk(lease, time.time())
            move.status["slots"] = len(slots)
            log.info("lease for %s gives a slot to %s, who waits; %d left", client, owed.party.member, len(slots))
            self._offer_to_waiting(owed)
            return True

        async def run_slot(slot: TaskSlot, tasks: trio.MemoryReceiveChannel[Task]) -> None:
            nonlocal answered_at, looking_again
            async with tasks:
                while not leaves(slot):
                    with trio.CancelScope() as waiting:
                        idle.add(waiting)
                        try:
                            task_id, payload, shared, values = await tasks.receive()
                        except trio.EndOfChannel:
                            return
                        finally:
                            idle.discard(waiting)
                    if waiting.cancelled_caught:
                        continue  # poked: look again whether to leave
                    if not ledger.task_started(task_id):
                        continue  # withdrawn or handed back while it waited, and answered then
                    started = trio.current_time()
                    with trio.CancelScope() as stopper, self._recording(move, slot, client) as record:
                        stoppers[task_id] = stopper
                        self.running += 1
                        try:
                            outcome = await slot.run(payload, shared, values)
                            if slot.missing is not None:  # it could not even load: the client runs it elsewhere
                                op = op_parts(Op.MISSING, task_id, slot.missing.encode())
                                record.outcome = "failed"
                            else:
                                op = op_parts(Op.RESULT, task_id, outcome)
                                record.outcome = "failed" if slot.raised else "ok"
                            del outcome
                        except TaskProcessDied as exc:
                            log.warning("task %d of %s: %s", task_id, client, exc)
                            op = op_parts(Op.FAILED, task_id, str(exc).encode())
                        finally:
                            del stoppers[task_id]
                            self.running -= 1
                    del payload, shared, values
                    if stopper.cancelled_caught:
                        log.info("task %d of %s interrupted as asked", task_id, client)
                        op = op_parts(Op.CANCELLED, task_id)
                    ledger.task_answered(task_id, None if stopper.cancelled_caught else trio.current_time() - started)
                    answered_at = trio.current_time()
                    post(*op)
                    if not ledger.queued and not looking_again:  # idle, unless its next task is on its way
                        looking_again = True
                        nursery.start_soon(look_again)

        async def look_again() -> None:
            nonlocal looking_again
            await trio.sleep(IDLE_GRACE)
            looking_again = False
            post()

        def giving_way() -> bool:
            """Its last slot is owed to a more deserving request; once so, for good (the client was told,
            by RETURNED, that no more credit comes: the lease must end even if that request goes away)."""
            nonlocal gave_way
            gave_way = gave_way or (len(slots) == 1 and self.sharing.owed(lease, time.time()) is not None)
            return gave_way

        def expired() -> bool:
            """Stopping or giving way, or someone waits and this lease is idle after its work, or older
            than lease_seconds."""
            if self.draining or giving_way():
                return True
            done = (ledger.answered > 0 and not ledger.running and not ledger.queued
                    and trio.current_time() - answered_at >= IDLE_GRACE)
            return ((done or trio.current_time() - started > self.config.lease_seconds)
                    and self.sharing.contended(req, time.time()))

        def hand_back() -> None:
            """Stopping or giving way: what has not started runs elsewhere, at once."""
            for task_id in sorted(ledger.queued):
                ledger.withdraw(task_id)
                outbox.extend(op_parts(Op.RETURNED, task_id))

        def gathering() -> bool:
            """Hold the answers a moment: short tasks are queued behind the running ones, so the next
            answer is due within moments, and the slots stay busy meanwhile."""
            return (not finished and not self.draining and bool(ledger.queued) and bool(ledger.running)
                    and ledger.mean_seconds is not None and ledger.mean_seconds < GATHER_SECONDS
                    and len(outbox) < GATHER_OPS)

        def refill() -> int:
            """Credit to grant now: the client's window refills once half of what may queue here is
            answered, so it sends its tasks several to a message (and gets their answers so too)."""
            queue = credit_window(ledger.slots, ledger.mean_seconds) - ledger.slots
            if ledger.outstanding > ledger.slots + queue // 2:
                return 0  # the client holds credit still, or its tasks are here: their answers bring this
            return ledger.grant()

        async def send_mail() -> None:
            nonlocal mail, finished
            while True:
                await mail.wait()
                mail = trio.Event()
                if gathering():
                    with trio.move_on_after(GATHER_SECONDS):
                        while gathering():
                            await mail.wait()
                            mail = trio.Event()
                if self.draining or (not finished and giving_way()):
                    hand_back()
                batch, outbox[:] = outbox[:], []
                if not finished and expired() and ledger.answered == ledger.received:
                    log.info("lease for %s ends after %.0f s: %s", client, trio.current_time() - started,
                             "this worker is stopping" if self.draining else "another client is waiting")
                    finished = True
                if finished:
                    batch.append(encode_op(Op.END))
                elif not expired() and (grant := refill()):
                    batch.append(encode_op(Op.CREDIT, grant))
                if batch:
                    await channel.send(batch)
                del batch
                if finished:
                    nursery.cancel_scope.cancel()  # stop receiving; late tasks are the client's to requeue
                    return

        async def receive() -> None:
            async with send_tasks:
                while (plaintext := await channel.recv()) is not None:
                    memfd = hop.shared_fd(plaintext.obj)  # a big message lands in shared memory
                    for op, arg, data, offset in decode_ops(plaintext):
                        if op is Op.END:
                            return
                        if op is Op.TASK or op is Op.TASK_WITH_VALUES:
                            ledger.task_received(arg)
                            if self.draining:  # sent on credit granted before we began to stop
                                ledger.withdraw(arg)
                                post(*op_parts(Op.RETURNED, arg))
                                continue
                            values: list[Blob] = []
                            if op is Op.TASK_WITH_VALUES:
                                values, missing, data, offset = blobs.task(arg, data, offset)
                                if missing:  # evicted, or held before a restart: the client sends it again
                                    ledger.withdraw(arg)
                                    post(*op_parts(Op.UNCACHED, arg, *missing))
                                    continue
                            shared = (memfd, offset) if memfd is not None and data.nbytes >= hop.SHARED_MIN else None
                            send_tasks.send_nowait((arg, data, shared, values))
                        elif op is Op.BLOB:
                            await blobs.blob(arg, data, memfd, offset)
                        elif op is Op.PING:
                            pass
                        elif op is Op.MOVE:
                            await self._follow_move(channel, move, client)
                        elif op in (Op.WITHDRAW, Op.INTERRUPT):
                            if ledger.withdraw(arg):
                                post(*op_parts(Op.CANCELLED, arg))
                            elif op is Op.INTERRUPT and arg in stoppers:
                                stoppers[arg].cancel()  # kills its task process; run_slot answers
                        else:
                            raise ProtocolError(f"client {client} sent unexpected {op.name}")

        async def time_is_up() -> None:
            await trio.sleep(self.config.lease_seconds)
            post()

        async def heartbeat() -> None:
            while True:
                await trio.sleep(HEARTBEAT_SECONDS)
                if not self.config.who.keyring.allows(client, client_key):  # the owner took them out
                    raise ProtocolError(f"{client} is no longer a member of {self.config.who.cluster}")
                post(encode_op(Op.PING))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_mail)
            nursery.start_soon(time_is_up)
            nursery.start_soon(heartbeat)
            post()  # the first message carries the initial credit
            self._pokes.add(poke)
            try:
                async with trio.open_nursery() as running:
                    async with receive_tasks:
                        for slot in slots:
                            running.start_soon(run_slot, slot, receive_tasks.clone())
                    await receive()  # on END, the slots finish what they hold
            except BaseException:
                nursery.cancel_scope.cancel()
                raise
            finally:
                self._pokes.discard(poke)
            finished = True
            post()


def _answer(request: messages.Message) -> dict[str, str | None]:
    """Our versions of the distributions a request asks about."""
    asked = request.body.get("dists")
    return environment.answer(asked) if isinstance(asked, list) else {}


def _party(request: messages.Message) -> Party:
    """Who asks: the member, and their client (its ``client`` id; the request id from older clients)."""
    client = request.body.get("client")
    return Party(request.sender, client if isinstance(client, str) else request["req"])


def _need_in(request: messages.Message) -> Need:
    """What a request asks of each slot (ValueError or TypeError if it is garbled)."""
    return Need.from_json(request.body["need"]) if "need" in request.body else ANY


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
