"""One lease's I/O on the worker: receive the client's tasks, run them on the lease's slots, send the
answers with credit.  Every decision (which task runs, what goes back, credit, when a slot leaves and
when the lease ends) is :class:`~.lease_decisions.LeaseDecisions`'s; this carries them out.

Tasks go through a memory channel to one runner per slot.  Answers go to an outbox that one sender
drains: whatever finished while the previous message was being written leaves in the next one, with
the credit that refills the client's window.  That sender also writes the final END, so no write is
ever cancelled halfway.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ..errors import ProtocolError
from ..protocol.frames import Buffer, Op, decode_ops, encode_op, op_parts
from ..protocol.lease import HEARTBEAT_SECONDS
from ..transport.channel import SecureChannel
from . import hop
from .history import Entry
from .lease_decisions import GATHER_SECONDS, IDLE_GRACE, LeaseDecisions
from .slots import TaskProcessDied, TaskSlot
from .valuecache import Blob, LeaseBlobs

if TYPE_CHECKING:
    from .daemon import Move, WorkerDaemon

log = logging.getLogger("p2pexec.worker")

Task = tuple[int, memoryview, "tuple[int, int] | None", list[Blob]]  # id, payload, (memfd, offset) if shared, values


@dataclass
class _Ran:
    """One task as the history records it; ``outcome`` stays ``killed`` unless the task answers."""

    start: float  # Unix time
    clock: float  # trio.current_time() at the start
    outcome: str = "killed"


class LeaseServer:
    """Serves one lease until it ends; the client may only send what we credited."""

    def __init__(self, daemon: WorkerDaemon, channel: SecureChannel, slots: list[TaskSlot],
                 decisions: LeaseDecisions, move: Move, client_key: bytes) -> None:
        self.daemon = daemon  # the worker: its config, history, leases to poke, and the board for offers
        self.channel = channel
        self.slots = slots
        self.decisions = decisions
        self.client = decisions.client
        self.move = move  # for status, and to follow the lease onto a direct connection
        self.client_key = client_key  # it must stay a member's key
        self.blobs = LeaseBlobs(daemon.values, self.client)
        self.send_tasks, self.receive_tasks = trio.open_memory_channel[Task](math.inf)
        self.outbox: list[Buffer] = []  # answers (and RETURNED, CANCELLED...) for the next message
        self.mail = trio.Event()  # the outbox has news: wake the sender
        self.looking_again = False  # a look_again is pending: the lease may fall idle
        self.stoppers: dict[int, trio.CancelScope] = {}  # running task id -> what interrupts it
        self.idle: set[trio.CancelScope] = set()  # slots waiting for a task: a poke makes them look up
        self.nursery: trio.Nursery | None = None

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._send_mail)
            nursery.start_soon(self._time_is_up)
            nursery.start_soon(self._heartbeat)
            self.post()  # the first message carries the initial credit
            self.daemon.pokes.add(self.poke)
            try:
                async with trio.open_nursery() as running:
                    async with self.receive_tasks:
                        for slot in self.slots:
                            running.start_soon(self._run_slot, slot, self.receive_tasks.clone())
                    await self._receive()  # on END, the slots finish what they hold
            except BaseException:
                nursery.cancel_scope.cancel()
                raise
            finally:
                self.daemon.pokes.discard(self.poke)
            self.decisions.finished = True
            self.post()

    def post(self, *op: Buffer) -> None:
        self.outbox.extend(op)
        self.mail.set()

    def poke(self) -> None:
        """Someone started waiting: check whether they are owed a slot, busy or idle."""
        self.post()
        for scope in list(self.idle):
            scope.cancel()

    def _leaves(self, slot: TaskSlot) -> bool:
        """Between two tasks: does this slot go to a more deserving request?"""
        given = self.decisions.leaves(slot.index, time.time())
        if given is None:
            return False
        member, actions = given
        self.move.status["slots"] = len(self.decisions.slots)
        log.info("lease for %s gives a slot to %s, who waits; %d left", self.client, member, len(self.decisions.slots))
        self.daemon.carry_out(actions)
        return True

    async def _run_slot(self, slot: TaskSlot, tasks: trio.MemoryReceiveChannel[Task]) -> None:
        decisions = self.decisions
        async with tasks:
            while not self._leaves(slot):
                with trio.CancelScope() as waiting:
                    self.idle.add(waiting)
                    try:
                        task_id, payload, shared, values = await tasks.receive()
                    except trio.EndOfChannel:
                        return
                    finally:
                        self.idle.discard(waiting)
                if waiting.cancelled_caught:
                    continue  # poked: look again whether to leave
                if not decisions.task_started(task_id):
                    continue  # withdrawn or handed back while it waited, and answered then
                started = trio.current_time()
                with trio.CancelScope() as stopper, self._recording(slot) as record:
                    self.stoppers[task_id] = stopper
                    self.daemon.running += 1
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
                        log.warning("task %d of %s: %s", task_id, self.client, exc)
                        op = op_parts(Op.FAILED, task_id, str(exc).encode())
                    finally:
                        del self.stoppers[task_id]
                        self.daemon.running -= 1
                del payload, shared, values
                if stopper.cancelled_caught:
                    log.info("task %d of %s interrupted as asked", task_id, self.client)
                    op = op_parts(Op.CANCELLED, task_id)
                now = trio.current_time()
                idle = decisions.task_answered(task_id, None if stopper.cancelled_caught else now - started, now)
                self.post(*op)
                if idle and not self.looking_again:  # idle, unless its next task is on its way
                    self.looking_again = True
                    assert self.nursery is not None
                    self.nursery.start_soon(self._look_again)

    @contextmanager
    def _recording(self, slot: TaskSlot) -> Iterator[_Ran]:
        """Count the task in its lease and record it in the history, however it ends."""
        ran = _Ran(time.time(), trio.current_time())
        try:
            yield ran
        finally:
            self.move.ran[ran.outcome] += 1
            self.daemon.history.add(Entry(self.client, slot.function, ran.start, trio.current_time() - ran.clock,
                                          ran.outcome, self.daemon.config.who.cluster))

    async def _look_again(self) -> None:
        await trio.sleep(IDLE_GRACE)
        self.looking_again = False
        self.post()

    async def _send_mail(self) -> None:
        decisions = self.decisions
        while True:
            await self.mail.wait()
            self.mail = trio.Event()
            if decisions.gathering(len(self.outbox)):
                with trio.move_on_after(GATHER_SECONDS):
                    while decisions.gathering(len(self.outbox)):
                        await self.mail.wait()
                        self.mail = trio.Event()
            mail = decisions.mail(trio.current_time(), time.time())
            for task_id in mail.returned:
                self.outbox.extend(op_parts(Op.RETURNED, task_id))
            batch, self.outbox[:] = self.outbox[:], []
            if mail.end:
                batch.append(encode_op(Op.END))
            elif mail.credit:
                batch.append(encode_op(Op.CREDIT, mail.credit))
            if batch:
                await self.channel.send(batch)
            del batch
            if mail.end:
                assert self.nursery is not None
                self.nursery.cancel_scope.cancel()  # stop receiving; late tasks are the client's to requeue
                return

    async def _receive(self) -> None:
        decisions, blobs = self.decisions, self.blobs
        async with self.send_tasks:
            while (plaintext := await self.channel.recv()) is not None:
                memfd = hop.shared_fd(plaintext.obj)  # a big message lands in shared memory
                for op, arg, data, offset in decode_ops(plaintext):
                    if op is Op.END:
                        return
                    if op is Op.TASK or op is Op.TASK_WITH_VALUES:
                        if not decisions.task_received(arg):
                            self.post(*op_parts(Op.RETURNED, arg))
                            continue
                        values: list[Blob] = []
                        if op is Op.TASK_WITH_VALUES:
                            values, missing, data, offset = blobs.task(arg, data, offset)
                            if missing:  # evicted, or held before a restart: the client sends it again
                                decisions.uncached(arg)
                                self.post(*op_parts(Op.UNCACHED, arg, *missing))
                                continue
                        shared = (memfd, offset) if memfd is not None and data.nbytes >= hop.SHARED_MIN else None
                        self.send_tasks.send_nowait((arg, data, shared, values))
                    elif op is Op.BLOB:
                        await blobs.blob(arg, data, memfd, offset)
                    elif op is Op.PING:
                        pass
                    elif op is Op.MOVE:
                        await self.daemon.leases.follow_move(self.channel, self.move, self.client)
                    elif op in (Op.WITHDRAW, Op.INTERRUPT):
                        verdict = decisions.cancel(arg, interrupt=op is Op.INTERRUPT)
                        if verdict == "cancelled":
                            self.post(*op_parts(Op.CANCELLED, arg))
                        elif verdict == "interrupt":
                            self.stoppers[arg].cancel()  # kills its task process; _run_slot answers
                    else:
                        raise ProtocolError(f"client {self.client} sent unexpected {op.name}")

    async def _time_is_up(self) -> None:
        await trio.sleep(self.decisions.lease_seconds)
        self.post()

    async def _heartbeat(self) -> None:
        who = self.daemon.config.who
        while True:
            await trio.sleep(HEARTBEAT_SECONDS)
            if not who.keyring.allows(self.client, self.client_key):  # the owner took them out
                raise ProtocolError(f"{self.client} is no longer a member of {who.cluster}")
            self.post(encode_op(Op.PING))
