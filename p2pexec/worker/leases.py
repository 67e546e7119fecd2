"""The worker's door for leases: how a client's libp2p stream becomes a lease, moves, and ends.

A client opens a stream and sends its signed accept; :meth:`Leases.handle_stream`
checks it (:meth:`~Leases.authenticate`), asks the core for the slots
(:meth:`~.decisions.WorkerCore.admit`), derives the lease's keys and runs the
lease (the daemon's ``_serve_lease``, which a test double overrides), then
gives the slots back.  A stream that starts with a resume frame is not a new
lease but a live one moving to a direct connection (:meth:`~Leases.resume`,
:meth:`~Leases.follow_move`).  It is apart from :mod:`.daemon` because it is
the lease protocol's handshake, with its own state (the live leases that may
move, whether hole punching failed), while the daemon is the board's side.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from .. import portability
from ..errors import ProtocolError, first_leaf
from ..protocol import messages
from ..protocol.frames import MAX_FRAME
from ..protocol.sealing import RESUME_MAGIC, resume_frame, session_keys
from ..protocol.lease import SILENCE_SECONDS
from ..transport.channel import FramedStream, SecureChannel
from ..transport.host import Libp2pHost
from ..transport.yamux_window import open_wide
from . import hop
from .decisions import Grant
from .lease_decisions import LeaseDecisions

if TYPE_CHECKING:
    from .daemon import WorkerDaemon

log = logging.getLogger("p2pexec.worker")

HANDSHAKE_TIMEOUT = 10.0
MAX_HANDSHAKE_FRAME = messages.MAX_LINE_BYTES
PUNCH_GIVES_UP = 20.0  # a lease still relayed this long after it started will not be hole-punched


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


class Leases:
    """The lease handshake and the live leases, for one :class:`~.daemon.WorkerDaemon`."""

    def __init__(self, daemon: WorkerDaemon) -> None:
        self.daemon = daemon  # its core (slots, offers), config, value cache, and the board for news
        self.moves: dict[bytes, Move] = {}  # resume frame -> the live lease it may move
        self.punch_failed = False  # a lease stayed relayed: our NAT defeats hole punching

    def status(self, most: int = 16) -> list[dict[str, Any]]:
        """The live leases as ``p2pexec status`` shows them (client, path, slots, start)."""
        return [move.status for move in list(self.moves.values())[:most]]

    async def handle_stream(self, stream: Any) -> None:
        """A client's new lease stream: the handshake, then the lease until it ends (or a resumed lease's stream)."""
        daemon = self.daemon
        framed = FramedStream(stream, max_frame=MAX_HANDSHAKE_FRAME)
        grant: Grant | None = None
        move: Move | None = None
        try:
            deadline = trio.current_time() + HANDSHAKE_TIMEOUT
            with trio.fail_at(deadline):
                first = await framed.recv()
                if first is None:
                    raise ProtocolError("peer closed the stream before sending its accept")
            if first.startswith(RESUME_MAGIC):  # held for the rest of the lease's life: not within the deadline
                return await self.resume(stream, first)
            with trio.fail_at(deadline):
                accept = self.authenticate(first)
                grant = daemon.core.admit(accept, time.time())
                if grant is None:  # the offer's slots went to another accept first: a race, not an attack
                    log.debug("an accept from %s came after its offer's slots were taken; it will ask again",
                              accept.sender)
                    await framed.reset()
                    return
                offer, slots = grant.offer, [daemon.slots[i] for i in grant.slots]
                rx, tx = session_keys("worker", *offer.kx, messages.unb64(accept["kx"], 32))
                channel = await SecureChannel.establish(framed, rx, tx, allocate=hop.allocate)
                await open_wide(stream)  # a member's lease, read all the time
                if daemon.host is not None:
                    daemon.host.proved(stream.muxed_conn.peer_id)  # a member's client: not a stranger any more
            framed.decoder.max_frame = MAX_FRAME
            framed.silence_limit = SILENCE_SECONDS
            status = {"client": accept.sender, "path": Libp2pHost.stream_path(stream), "slots": len(slots),
                      "started": time.time()}
            move = Move(stream.muxed_conn.peer_id, resume_frame(rx, tx, accept["offer"]), status)
            self.moves[move.token] = move
            for slot in slots:
                await slot.assign(accept.sender, grant.recycle)
                slot.limit = grant.limit if portability.rlimits() else None
            log.info("lease for %s with %d slot(s) started (%s)", accept.sender, len(slots), status["path"])
            if status["path"] == "relayed" and daemon.background is not None:
                daemon.background.start_soon(self._watch_punch, move, accept.sender)
            daemon.values.lease_started(accept.sender)
            try:
                decisions = LeaseDecisions(daemon.core, offer.id, accept.sender, accept["req"], list(grant.slots),
                                           daemon.config.lease_seconds, trio.current_time(), grant.recycle)
                await daemon._serve_lease(channel, slots, decisions, move, accept.key)
            finally:
                daemon.values.lease_ended(accept.sender, time.monotonic())
                if not daemon.config.who.keyring.allows(accept.sender, accept.key):  # removed: forget at once
                    daemon.values.drop(accept.sender)
                daemon.expire_values()
                with trio.CancelScope(shield=True):
                    await channel.close()
        except* (ProtocolError, messages.InvalidMessage, trio.TooSlowError) as group:  # nurseries group them
            exc = first_leaf(group)
            # an accept that reaches a stopping worker is expected, not worth a warning
            (log.debug if daemon.draining else log.warning)("dropped a lease stream: %s", exc or type(exc).__name__)
            await framed.reset()
        except* Exception as group:  # a bug of ours must cost one lease, not the worker
            log.error("dropped a lease stream after an unexpected error; please report it",
                      exc_info=first_leaf(group))
            await framed.reset()
        finally:
            if move is not None:
                self.moves.pop(move.token, None)
                move.done.set()
                self._lease_ended(move)
            if grant is not None:
                daemon.carry_out(daemon.core.lease_ended(grant.offer.id, time.time()))
                daemon.check_drained()

    def authenticate(self, line: bytes) -> messages.Message:
        """The accept, its signature checked (the core checks it names an offer of ours)."""
        if self.daemon.draining:
            raise ProtocolError("an accept came while this worker is stopping; it takes no new lease")
        inbox = self.daemon.inbox
        msg = inbox.receive(line, time.time())
        if msg is None:
            raise ProtocolError(f"invalid accept ({', '.join(inbox.dropped)})")
        return msg

    def _lease_ended(self, move: Move) -> None:
        """One line per lease for the friend's log: whose, how long, how many tasks and how they ended."""
        self.daemon.history.flush()
        ran = move.ran
        log.info("lease for %s ended after %.1f s: %d task(s), %d failed, %d killed", move.status["client"],
                 time.time() - move.status["started"], sum(ran.values()), ran["failed"], ran["killed"])

    async def _watch_punch(self, move: Move, client: str) -> None:
        await trio.sleep(PUNCH_GIVES_UP)
        if move.token in self.moves and move.status["path"] == "relayed" and not self.punch_failed:
            self.punch_failed = True
            log.info("the lease for %s is still relayed after %.0f s: hole punching failed (a NAT that picks a new "
                     "port per connection?); leases stay on the relay, at its speed", client, PUNCH_GIVES_UP)

    async def resume(self, stream: Any, token: bytes) -> None:
        """A client's new stream for a lease it is moving (onto a direct connection); held until the lease ends."""
        move = self.moves.get(token)
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
        await open_wide(move.stream)
        await channel.move_tx(move.stream)
        channel.framed.move_rx(move.stream)
        await channel.framed.close_old()
        move.status["path"] = f"upgraded after {time.time() - move.status['started']:.1f} s"
        self.punch_failed = False
        log.info("lease for %s moved to a %s connection", client, Libp2pHost.stream_path(move.stream))
