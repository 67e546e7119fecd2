"""One lease, as the client runs it: dial the worker, set up the encrypted channel, feed it tasks.

The client's core (:mod:`.client_core`) decides which offers to accept and
which tasks go where, and keeps each lease's accounting in a
:class:`~.client_state.LeaseState`; a :class:`Lease` does the I/O of one
accepted offer on the client's trio loop, until the worker or the client
ends it, and reports what its worker answers.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import trio

from . import portability
from .client_core import END, WAIT
from .errors import ProtocolError, ResultTooLargeError, TaskProcessDiedError, first_leaf
from .protocol import messages
from .protocol.frames import Buffer, MessageTooLarge, Op, Recycled, decode_ops, encode_op, op_parts, read_failed
from .protocol.sealing import resume_frame, session_keys
from .protocol.lease import HEARTBEAT_SECONDS, SILENCE_SECONDS
from .protocol.reach import CIRCUIT
from .protocol.values import split_digests, task_header
from .stdlib_private import cancel_running
from .transport.channel import FramedStream, PeerLost, SecureChannel
from .transport.host import RELAY_JOIN_TIMEOUT, Unreachable
from .transport.yamux_window import open_wide

if TYPE_CHECKING:
    from .client_state import LeaseState, WorkItem
    from .scheduler import ClientScheduler

log = logging.getLogger("p2pexec.client")

BATCH_BYTES = 1 << 20  # what one message to a worker carries at most (tasks beyond it go in the next)
UPGRADE_RETRY = 2.0


class Lease:
    """The I/O of one lease; its accounting is :attr:`state`, which the client's core reads."""

    def __init__(self, client: ClientScheduler, state: LeaseState) -> None:
        self.client = client
        self.state = state
        self.worker = state.worker  # the member: bans go by it
        self.label = state.label  # the member and its machine's name: what logs say
        self.peer = state.peer
        self.channel: SecureChannel | None = None
        self.moving: Any = None  # the direct stream the lease is moving to, until the worker's MOVE
        self.nursery: trio.Nursery | None = None  # its I/O tasks, once established
        self.woken = trio.Event()  # set by ClientScheduler: the feeder has something to look at
        self.idle = False  # the feeder counts down lease_idle

    def __repr__(self) -> str:
        return repr(self.state)

    async def run(self, offer: messages.Message) -> None:
        assert self.client.host is not None
        reason: str | None = None  # None: the lease ended in good order
        dialed = False
        try:
            stream = await self._dial([str(a) for a in offer["addrs"]][:16])
            dialed = True
            framed = FramedStream(stream)
            try:
                terms = {"offer": offer.id, "worker": offer.sender, "req": offer["req"],
                         "kx": messages.b64(self.client.kx_keys[0]), "slots": self.state.slots}
                if self.client.options.max_tasks_per_child is not None:
                    terms["recycle"] = self.client.options.max_tasks_per_child
                accept = self.client.sign("accept", terms, ttl=30)
                await framed.send(accept)
                rx, tx = session_keys("client", *self.client.kx_keys, messages.unb64(offer["kx"], 32))
                channel = self.channel = await SecureChannel.establish(
                    framed, rx, tx, allocate=Recycled() if portability.lazy_free() else None,
                    max_message=self.client.options.max_result_size)
                await open_wide(stream)
                framed.silence_limit = SILENCE_SECONDS
                self.state.open = True
                log.info("leased %d slot(s) of worker %s (%s connection, %s)", self.state.slots, self.label,
                         self.state.path, channel.cipher)
                if self.client.board is not None:  # tell the others; the worker has consumed it already
                    self.client.board.send(accept)
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    nursery.start_soon(self._feed)
                    nursery.start_soon(self._heartbeat)
                    if self.state.path == "relayed":
                        nursery.start_soon(self._upgrade, resume_frame(rx, tx, offer.id))
                    while await self._take(await channel.recv()):
                        pass  # (a message is held by _take alone: a big one is let go before the next is awaited)
                    nursery.cancel_scope.cancel()
            finally:
                if self.channel is not None:
                    with trio.CancelScope(shield=True):
                        await self.channel.close()
                else:
                    await framed.reset()
        except* MessageTooLarge as group:
            reason = self._too_large(first_leaf(group))
        except* (ProtocolError, messages.InvalidMessage) as group:  # raised in the lease's nursery too
            exc = first_leaf(group)
            reason = str(exc)
            if self.channel is None:  # e.g. its slots went to another accept first
                log.debug("could not lease worker %s: %s", self.label, exc)
            elif isinstance(exc, PeerLost):  # it died, or the network did: it may come back
                log.warning("lost worker %s: %s", self.label, exc)
            else:
                self.client.core.ban(self.worker, reason)
                log.warning("dropped worker %s (peer %s), which broke the protocol: %s; its tasks run elsewhere "
                            "and this executor will use no worker of %s again", self.label, self.peer, exc,
                            self.worker)
        except* Exception as group:  # a bug of ours must cost one lease, not every future of the executor
            reason = f"unexpected error: {first_leaf(group)!r}"
            log.error("lease with worker %s failed; its tasks are retried. Please report this:", self.label,
                      exc_info=first_leaf(group))
        finally:
            self.client.lease_ended(self, reason, dialed)

    def _too_large(self, exc: MessageTooLarge) -> str | None:
        """Fail the task whose result is over max_result_size; the lease ends, its other tasks run again."""
        culprit = exc.culprit()
        item = self.state.inflight.pop(culprit[1], None) if culprit and culprit[0] is Op.RESULT else None
        if item is None or culprit is None:
            self.client.core.ban(self.worker, str(exc))
            log.warning("dropped worker %s, which announced %d bytes for no task it holds; this executor will use "
                        "no worker of %s again", self.label, exc.total, self.worker)
            return str(exc)
        self.client.set_exception(item, ResultTooLargeError(
            f"worker {self.label} has a {culprit[2]}-byte result for this task, over max_result_size="
            f"{exc.limit}; pass a larger max_result_size= to accept it"))
        log.warning("refused a %d-byte result from worker %s (max_result_size=%d)", culprit[2], self.label, exc.limit)
        return None

    async def _dial(self, addrs: list[str]) -> Any:
        """Reach the worker by any of its addresses; back off per worker when none works."""
        assert self.client.host is not None and self.client.nat is not None
        relay_errors: dict[str, str] = {}
        try:
            for circuit in dict.fromkeys(a for a in addrs if CIRCUIT in a):
                try:
                    with trio.fail_after(RELAY_JOIN_TIMEOUT):
                        await self.client.nat.member_of(circuit)
                except (ProtocolError, trio.TooSlowError) as exc:
                    relay_errors[f"{circuit}/p2p/{self.peer}"] = f"its relay did not take us: {exc or 'timed out'}"
            stream = await self.client.host.open_stream(self.peer, addrs)
        except Unreachable as exc:
            exc = Unreachable(self.peer, {**exc.attempts, **relay_errors})
            delay, first = self.client.core.dial_failed(self.label, self.peer, str(exc), time.monotonic())
            (log.warning if first else log.debug)(
                "cannot reach worker %s: %s; trying it again in %.0f s", self.label, exc, delay)
            raise exc from None
        if self.client.core.dial_reached(self.label, self.peer):
            log.info("reached worker %s after all", self.label)
        self.state.path = self.client.host.stream_path(stream)
        return stream

    async def _feed(self) -> None:
        channel, state, core = self.channel, self.state, self.client.core
        assert channel is not None
        idle_since: float | None = None  # (heartbeats wake us too: they must not make an idle lease look busy)
        while True:
            batch: list[Buffer] = [*state.control]
            state.control.clear()
            size = 0
            while size < BATCH_BYTES and (item := core.take(state, time.monotonic())) is not None:
                if item.values:
                    batch, arriving = await self._send_values(item, batch)
                    batch.extend(op_parts(Op.TASK_WITH_VALUES, item.id,
                                          task_header([v.digest for v in item.values], arriving), *item.payload))
                else:
                    batch.extend(op_parts(Op.TASK, item.id, *item.payload))
                size += item.size
                core.tally.bytes_sent += item.size
            if batch:  # everything sendable now goes in one message: one write, not one per task
                await channel.send(batch)
                del batch
                continue
            verdict = core.feeding(state)
            if verdict == END:
                break
            self.idle = verdict != WAIT
            if not self.idle:
                idle_since = None
                await self._wait_change()
                continue
            idle_since = trio.current_time() if idle_since is None else idle_since
            left = self.client.options.lease_idle - (trio.current_time() - idle_since)
            if left <= 0:
                break
            with trio.move_on_after(left):
                await self._wait_change()
        await channel.send(encode_op(Op.END))

    async def _wait_change(self) -> None:
        await self.woken.wait()
        self.woken = trio.Event()

    async def _send_values(self, item: WorkItem, batch: list[Buffer]) -> tuple[list[Buffer], bool]:
        """Send the big values ``item`` uses that its worker may not hold, each in a message of its own
        (after ``batch``, which goes first); returns the batch to go on with, and whether the task must
        say that a value may still be arriving on another lease (:meth:`SentValues.arriving`)."""
        assert self.channel is not None
        sent, names = self.client.core.sent_values(self.peer), [v.digest for v in item.values]
        while not item.uncached and sent.sending_elsewhere(names, self.state):  # one crossing is enough
            batch = await self._flushed(batch)
            await self._wait_change()
        sending = sent.to_send(names, self.state, every=item.uncached)
        item.sent_with = tuple(sending)
        if sending:
            batch = await self._flushed(batch)
            ok = False
            try:
                await self._send_blobs(item, sending)
                ok = True
            finally:
                sent.sent(sending, self.state, ok)
                self.client.notify()  # the tasks of other leases that waited for these
        return batch, sent.arriving(names, self.state)

    async def _flushed(self, batch: list[Buffer]) -> list[Buffer]:
        """Send ``batch`` and the control ops queued since (heartbeats: a lease waiting in :meth:`_send_values`
        while another sends a value must not look frozen to its worker); returns an empty batch."""
        assert self.channel is not None
        batch += self.state.control
        self.state.control.clear()
        if batch:
            await self.channel.send(batch)
        return []

    async def _send_blobs(self, item: WorkItem, sending: list[bytes]) -> None:
        assert self.channel is not None
        tally, left = self.client.core.tally, set(sending)
        for value in item.values:
            if value.digest in left:  # (once, though the task uses it twice)
                left.remove(value.digest)
                await self.channel.send(op_parts(Op.BLOB, item.id, value.digest, *value.parts))
                tally.values_sent += 1
                tally.value_bytes_sent += value.size
                tally.bytes_sent += value.size

    async def _upgrade(self, resume: bytes) -> None:
        """Move a relayed lease onto a direct connection once hole punching made one.

        Relayed bytes are slow and libp2p closes the relayed connection about
        a minute after an upgrade, streams or not; so the lease moves at a
        message boundary: a new stream on the direct connection presents the
        resume frame, and MOVE ends the old stream in each direction.
        Nothing in flight is lost or repeated: the channel's sealing carries on.
        """
        assert self.client.host is not None and self.channel is not None
        started = trio.current_time()
        self.client.host.punch(self.peer)
        while True:
            await self.client.host.wait_direct(self.peer)
            try:
                stream = await self.client.host.direct_stream(self.peer)
                await FramedStream(stream).send(resume)
            except ProtocolError as exc:
                log.debug("moving the lease with %s to a direct connection failed, staying relayed: %s",
                          self.label, exc)
                await trio.sleep(UPGRADE_RETRY)
                continue
            break
        self.moving = stream
        self.state.path = f"upgraded after {trio.current_time() - started:.1f} s"  # said once the worker moved too
        await open_wide(stream)
        await self.channel.move_tx(stream)

    async def _heartbeat(self) -> None:
        """Let the worker tell a quiet lease from a frozen client; end the lease if its member left."""
        while True:
            await trio.sleep(HEARTBEAT_SECONDS)
            assert self.channel is not None
            self.channel.framed.check_silence()
            board = self.client.board
            if board is not None and not board.inbox.keyring.allows(self.worker, self.state.key):
                raise PeerLost(f"{self.worker} is no longer a member of {self.client.cluster}")
            self.state.control.append(encode_op(Op.PING))
            self.woken.set()

    async def _take(self, message: memoryview | None) -> bool:
        """Apply one message from the worker; False once the lease is over (END, or its final frame)."""
        if message is None:
            return False
        channel = self.channel
        assert channel is not None
        changed = False
        try:
            for op, arg, data, _ in decode_ops(message):
                if op is Op.MOVE:  # the worker's last message on the old stream
                    if self.moving is None:
                        raise ProtocolError(f"worker {self.label} moved a lease nobody asked to move")
                    channel.framed.move_rx(self.moving)
                    self.moving = None
                    await channel.framed.close_old()
                    log.info("lease with worker %s moved to a direct connection (%s)", self.label,
                             self.state.path)
                elif op is Op.END:
                    return False
                elif op is not Op.PING:
                    self._apply(op, arg, data)
                    changed = True
        finally:
            if changed:  # one wake-up of the feeders per message, however many answers it held
                self.client.answered(self)
        return True

    def _answered(self, task_id: int) -> WorkItem:
        item = self.state.answered(task_id)
        if item.values:  # the worker held them: tasks of other leases need not say they may be arriving
            self.client.core.sent_values(self.peer).answered([v.digest for v in item.values])
        return item

    def _apply(self, op: Op, arg: int, data: memoryview) -> None:
        """Apply one operation from the worker (not END, PING or MOVE); the caller then notifies the feeders."""
        state, client = self.state, self.client
        if op is Op.RESULT:
            client.resolve(self._answered(arg), data)
        elif op is Op.CREDIT:
            state.credits += arg
        elif op is Op.FAILED:
            item, (reason, stdout, stderr) = self._answered(arg), read_failed(data)
            client.replay(stdout, stderr)  # what it printed before it died
            client.set_exception(item, TaskProcessDiedError(
                f"{reason} while running this task on worker {self.label}; the task was not retried"))
        elif op is Op.CANCELLED:
            cancel_running(state.cancelled(arg).future)
        elif op is Op.RETURNED:  # the worker is stopping: it grants no more, and what it held runs elsewhere
            client.do(client.core.returned(state, arg))
        elif op is Op.MISSING:  # it could not import a module the task needs: elsewhere, then
            module = bytes(data[:100]).decode("ascii", errors="replace")
            client.do(client.core.missing(state, arg, module, time.monotonic()))
        elif op is Op.UNCACHED:  # it no longer holds a value: the task goes again, with the value
            client.do(client.core.uncached(state, arg, split_digests(data)))
        elif op is Op.SLOTS:  # fair sharing gave a slot to someone else: fill the others first, ask for more
            client.do(client.core.slots_taken(state, arg, time.monotonic()))
        else:
            raise ProtocolError(f"worker {self.label} sent unexpected {op.name}")
