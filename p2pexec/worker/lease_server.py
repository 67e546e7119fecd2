"""One lease's I/O on the worker: receive the client's tasks, run them on the lease's slots, send the
answers with credit.  Every decision (which task runs, what goes back, credit, when a slot leaves and
when the lease ends) is :class:`~.lease_decisions.LeaseDecisions`'s; this carries them out.

Tasks go through a memory channel to one runner per slot.  Answers go to the lease's
:class:`~.outbox.Outbox`, whose sender gathers them into messages with the credit that refills the
client's window, and writes the final END.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ..errors import ProtocolError
from ..protocol.frames import Buffer, Op, decode_ops, encode_op, failed_data, op_parts
from ..protocol.lease import HEARTBEAT_SECONDS
from ..transport.channel import SecureChannel
from . import hop
from .history import Entry
from .lease_decisions import GATHER_SECONDS, IDLE_GRACE, LeaseDecisions
from .outbox import Outbox
from .slots import TaskProcessDied, TaskSlot
from .valuecache import Blob, LeaseBlobs

if TYPE_CHECKING:
    from .daemon import Move, WorkerDaemon

log = logging.getLogger("p2pexec.worker")

Task = tuple[int, memoryview, "tuple[int, int] | None", list[Blob]]  # id, payload, (memfd, offset) if shared, values


class _Batch:
    """Tasks handed to one slot's task process together, in order: the head runs, the rest wait in its inbox.

    A task is withdrawn, handed back or interrupted before it starts by
    asking its task process to skip it (it says at once whether it did); an
    interrupted task that had started is stopped by killing its process,
    and what was left of the batch goes to a fresh one.
    """

    def __init__(self, slot: TaskSlot, tasks: list[Task]) -> None:
        self.slot = slot
        self.tasks = deque(tasks)
        self.numbers: dict[int, int] = {}  # task id -> its number in the current task process (for a SKIP)
        self.ids: dict[int, int] = {}  # and back
        self.interrupted: set[int] = set()
        self.withdrawn: set[int] = set()  # to skip unless started; skipped, they answer CANCELLED...
        self.returned: set[int] = set()  # ...or, these, RETURNED: the worker stops, they run elsewhere
        self.scope: trio.CancelScope | None = None  # the current attempt's: cancelling it kills the task process
        self.answers: list[Buffer] = []  # not posted yet (LeaseServer._post_held sends them within GATHER_SECONDS)

    async def interrupt(self, task_id: int) -> None:
        """Stop ``task_id``: skipped if it has not started, else its process is killed (now if it is the
        head, or once it becomes it)."""
        self.interrupted.add(task_id)
        if self.tasks[0][0] == task_id and self.scope is not None:
            self.scope.cancel()
        else:
            await self._skip([task_id])

    async def withdraw(self, task_id: int) -> None:
        """Withdraw ``task_id`` unless it has started: skipped (CANCELLED), else it runs (its result)."""
        await self._skip([task_id])

    async def hand_back(self) -> None:
        """The worker stops: what has not started is skipped and handed back (RETURNED), to run elsewhere."""
        task_ids = [task[0] for task in self.tasks]
        self.returned.update(task_ids)
        await self._skip(task_ids)

    def stopped(self) -> int | None:
        """Its attempt was stopped: the head, which answers CANCELLED, if it was the one interrupted; None if
        the stop was meant for a task that answered meanwhile (the head then runs again, in a fresh process)."""
        if not self.tasks or self.tasks[0][0] not in self.interrupted:
            if self.tasks:
                log.info("task %d was stopped by mistake; it runs again", self.tasks[0][0])
            return None
        return self.tasks[0][0]

    def skipped_answer(self, task_id: int) -> list[Buffer]:
        """What a task that never ran answers."""
        return op_parts(Op.RETURNED if task_id in self.returned else Op.CANCELLED, task_id)

    async def _skip(self, task_ids: list[int]) -> None:
        for task_id in task_ids:
            if task_id not in self.withdrawn:
                self.withdrawn.add(task_id)
                if task_id in self.numbers:  # else it is being handed over: :meth:`submitted` skips it
                    await self.slot.skip(self.numbers[task_id])

    async def submitted(self, numbers: list[int]) -> None:
        """The task process has the tasks, numbered ``numbers``: skip those withdrawn meanwhile."""
        self.numbers = {task[0]: number for task, number in zip(self.tasks, numbers)}
        self.ids = {number: task_id for task_id, number in self.numbers.items()}
        for task_id in self.withdrawn & self.numbers.keys():
            await self.slot.skip(self.numbers[task_id])

    def answered(self, task_id: int, op: list[Buffer]) -> None:
        """``task_id`` is answered by ``op``; if it was the head, the next becomes it (and is stopped, if that
        was asked)."""
        self.answers += op
        head = self.tasks[0][0] == task_id
        self.tasks.remove(next(task for task in self.tasks if task[0] == task_id))
        if head and self.tasks and self.tasks[0][0] in self.interrupted and self.scope is not None:
            self.scope.cancel()


@dataclass
class _Ran:
    """One task as the history records it; ``outcome`` stays ``killed`` unless the task answers."""

    start: float  # Unix time
    clock: float  # trio.current_time() at the start
    outcome: str | None = "killed"  # None: it never ran (withdrawn), nothing to record


@contextmanager
def _recording(server: LeaseServer, slot: TaskSlot) -> Iterator[_Ran]:
    """Count the task in its lease and record it in the worker's history, however it ends."""
    ran = _Ran(time.time(), trio.current_time())
    try:
        yield ran
    finally:
        if ran.outcome is not None:
            server.move.ran[ran.outcome] += 1
            server.daemon.history.add(Entry(server.client, slot.function, ran.start, trio.current_time() - ran.clock,
                                            ran.outcome, server.daemon.config.who.cluster))


class LeaseServer:
    """Serves one lease until it ends; the client may only send what we credited."""

    def __init__(self, daemon: WorkerDaemon, channel: SecureChannel, slots: list[TaskSlot],
                 decisions: LeaseDecisions, move: Move, client_key: bytes) -> None:
        self.daemon = daemon  # the worker: its config, history, leases to poke, and the board for offers
        self.channel = channel
        self.slots, self.decisions = slots, decisions
        self.client = decisions.client
        self.move = move  # for status, and to follow the lease onto a direct connection
        self.client_key = client_key  # it must stay a member's key
        self.blobs = LeaseBlobs(daemon.values, self.client, daemon.arrivals)
        self.send_tasks, self.receive_tasks = trio.open_memory_channel[Task | None](math.inf)  # None: look again
        self.outbox = Outbox(channel, decisions)
        self.post = self.outbox.post
        self.holding = trio.Event()  # a batch holds answers: post them within GATHER_SECONDS (_post_held)
        self.looking_again = False  # a look_again is pending: the lease may fall idle
        self.stoppers: dict[int, _Batch] = {}  # id of a task given to a task process -> what interrupts it
        self.batches: set[_Batch] = set()  # each slot's, while it runs one
        self.waiting = 0  # slots waiting for a task: a poke sends each a None to look up
        self.nursery: trio.Nursery | None = None

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._send_mail)
            nursery.start_soon(self._post_held)
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

    def poke(self) -> None:
        """Someone started waiting, or the worker stops: check whether they are owed a slot, busy or idle;
        a stopping worker hands back what its task processes hold but have not started."""
        self.post()
        with suppress(trio.ClosedResourceError):  # (the client ended the lease: the slots are finishing)
            for _ in range(self.waiting):
                self.send_tasks.send_nowait(None)
        if self.daemon.draining and self.nursery is not None:
            for batch in self.batches:
                self.nursery.start_soon(batch.hand_back)

    def _leaves(self, slot: TaskSlot) -> bool:
        """Between two tasks: does this slot go to a more deserving request?"""
        given = self.decisions.leaves(slot.index, time.time())
        if given is None:
            return False
        member, actions = given
        self.move.status["slots"] = len(self.decisions.slots)
        self.post(*op_parts(Op.SLOTS, len(self.decisions.slots)))  # the client no longer counts on it
        log.info("lease for %s gives a slot to %s, who waits; %d left", self.client, member, len(self.decisions.slots))
        self.daemon.carry_out(actions)
        return True

    async def _run_slot(self, slot: TaskSlot, tasks: trio.MemoryReceiveChannel[Task | None]) -> None:
        decisions = self.decisions
        async with tasks:
            while not self._leaves(slot):
                self.waiting += 1
                try:
                    first = await tasks.receive()
                except trio.EndOfChannel:
                    return
                finally:
                    self.waiting -= 1
                if first is None:
                    continue  # poked: look again whether to leave
                batch, size = [first], decisions.batch_size(tasks.statistics().current_buffer_used, slot.taken)
                while len(batch) < size:
                    try:
                        more = tasks.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    if more is not None:  # (a look-again meant for a slot that had just got a task)
                        batch.append(more)
                # (those withdrawn or handed back while they waited were answered then)
                batch = [task for task in batch if decisions.task_started(task[0])]
                first = more = None  # (tasks' payloads are views of the lease's messages: the batch alone holds
                if batch:            # them, and not once it ran, while the slot retires or waits)
                    await self._run_batch(slot, _Batch(slot, batch))
                    batch = []
                    if decisions.retires(slot.taken):  # as a pool's worker exits after max_tasks_per_child
                        await slot.retire(replace=not (decisions.finished or self.daemon.draining))

    async def _run_batch(self, slot: TaskSlot, batch: _Batch) -> None:
        """Run ``batch`` in order on ``slot``'s task process (a new one after a crash or an interrupt)."""
        for task in batch.tasks:
            self.stoppers[task[0]] = batch
        self.daemon.running += 1
        self.batches.add(batch)
        try:
            if self.daemon.draining:  # (it began while the batch was being formed)
                await batch.hand_back()
            while batch.tasks:
                await self._attempt(slot, batch)
            if self.outbox.carried and await self.outbox.send():  # (a turn of the loop sooner than the sender)
                self._ended()
        finally:
            if self.outbox.carried:  # (the lease is going down: the sender may still say them)
                self.post()
            for task in batch.tasks:  # (the lease is going down)
                self.stoppers.pop(task[0], None)
            self.batches.discard(batch)
            self.daemon.running -= 1

    async def _attempt(self, slot: TaskSlot, batch: _Batch) -> None:
        """One task process's go at what is left of ``batch``: it ends with the batch, or with its head
        (crashed, or interrupted: answered FAILED or CANCELLED) and the rest goes to a fresh process."""
        batch.numbers, batch.ids = {}, {}
        for task in list(batch.tasks):  # none of these ran: the process went down with one before them
            if task[0] in batch.interrupted or task[0] in batch.withdrawn:
                self._answer(batch, task[0], batch.skipped_answer(task[0]), None)
        if not batch.tasks:
            return
        since = trio.current_time()  # when the head started, as near as the daemon knows

        def skipped(number: int) -> None:
            task_id = batch.ids[number]
            self._answer(batch, task_id, batch.skipped_answer(task_id), None, at_once=True)

        slot.on_skipped = skipped
        with trio.CancelScope() as stopper:
            batch.scope = stopper
            try:
                await batch.submitted(await slot.submit([task[1:] for task in batch.tasks]))
                while batch.tasks:
                    with _recording(self, slot) as record:
                        outcome = await slot.outcome()
                        if outcome is None:  # the rest was skipped
                            record.outcome = None
                            break
                        head = batch.tasks[0][0]
                        if slot.missing is not None:  # it could not even load: the client runs it elsewhere
                            op = op_parts(Op.MISSING, head, slot.missing.encode())
                            record.outcome = "failed"
                        else:
                            op = op_parts(Op.RESULT, head, outcome)
                            record.outcome = "failed" if slot.raised else "ok"
                        del outcome
                    since = self._answer(batch, head, op, since)
            except TaskProcessDied as exc:
                head = batch.tasks[0][0]
                log.warning("task %d of %s: %s", head, self.client, exc)
                self._answer(batch, head, op_parts(Op.FAILED, head, failed_data(str(exc), *exc.output)), None)
        if stopper.cancelled_caught and (stopped := batch.stopped()) is not None:
            log.info("task %d of %s interrupted as asked", stopped, self.client)
            self._answer(batch, stopped, op_parts(Op.CANCELLED, stopped), None)

    def _answer(self, batch: _Batch, task_id: int, op: list[Buffer], since: float | None,
                at_once: bool = False) -> float:
        """``op`` answers ``task_id``, which ran since ``since`` (None: it did not finish); answers leave
        together once the batch is done, or within GATHER_SECONDS (:meth:`_post_held`).  Returns the time."""
        now = trio.current_time()
        batch.answered(task_id, op)
        del self.stoppers[task_id]
        idle = self.decisions.task_answered(task_id, None if since is None else now - since, now)
        if at_once or not batch.tasks:
            if at_once or len(self.batches) > 1 or not self.outbox.carry(batch.answers):  # (else: _run_batch)
                self.post(*batch.answers)
            batch.answers.clear()
        elif len(batch.answers) == len(op):  # the first held: it leaves within GATHER_SECONDS, whatever runs next
            self.holding.set()
        if idle and not self.looking_again:  # idle, unless its next task is on its way
            self.looking_again = True
            assert self.nursery is not None
            self.nursery.start_soon(self._look_again)
        return now

    async def _post_held(self) -> None:
        """Post the answers a batch held once GATHER_SECONDS passed, though the task after them runs on."""
        while True:
            await self.holding.wait()
            self.holding = trio.Event()
            await trio.sleep(GATHER_SECONDS)
            for batch in self.batches:
                if batch.answers:
                    self.post(*batch.answers)
                    batch.answers.clear()

    async def _look_again(self) -> None:
        await trio.sleep(IDLE_GRACE)
        self.looking_again = False
        self.post()

    async def _send_mail(self) -> None:
        await self.outbox.run()
        self._ended()

    def _ended(self) -> None:
        """END is sent: stop receiving; tasks sent after it are the client's to requeue."""
        assert self.nursery is not None
        self.nursery.cancel_scope.cancel()

    async def _receive(self) -> None:
        async with self.send_tasks:
            while await self._take(await self.channel.recv()):
                pass  # (a message is held by _take alone: a big one's memory goes before the next is awaited)

    async def _take(self, message: memoryview | None) -> bool:
        """Act on one message from the client; False once the lease is over (END, or its final frame)."""
        if message is None:
            return False
        decisions, blobs = self.decisions, self.blobs
        memfd = hop.sealed_fd(message.obj)  # a big message lands in shared memory
        for op, arg, data, offset in decode_ops(message):
            if op is Op.END:
                return False
            if op is Op.TASK or op is Op.TASK_WITH_VALUES:
                if not decisions.task_received(arg):
                    self.post(*op_parts(Op.RETURNED, arg))
                    continue
                values: list[Blob] = []
                arriving: list[bytes] | None = None
                missing: list[bytes] = []
                if op is Op.TASK_WITH_VALUES:
                    values, missing, data, offset, arriving = blobs.task(arg, data, offset)
                shared = (memfd, offset) if memfd is not None and data.nbytes >= hop.SHARED_MIN else None
                if missing and arriving is not None:  # on its way on another lease of the client's
                    assert self.nursery is not None
                    self.nursery.start_soon(self._once_arrived, arg, (arriving, values, missing),
                                            data, shared)
                elif missing:
                    self._uncached(arg, missing)
                else:
                    self.send_tasks.send_nowait((arg, data, shared, values))
            elif op is Op.BLOB:
                await blobs.blob(arg, data, memfd, offset)
            elif op is Op.MOVE:
                await self.daemon.leases.follow_move(self.channel, self.move, self.client)
            elif op in (Op.WITHDRAW, Op.INTERRUPT):
                verdict = decisions.cancel(arg, interrupt=op is Op.INTERRUPT)
                if verdict == "cancelled":
                    self.post(*op_parts(Op.CANCELLED, arg))
                elif verdict == "interrupt":
                    await self.stoppers[arg].interrupt(arg)  # skipped, or its process killed
                elif op is Op.WITHDRAW and arg in self.stoppers:  # in a batch: skipped unless started
                    await self.stoppers[arg].withdraw(arg)
            elif op is not Op.PING:
                raise ProtocolError(f"client {self.client} sent unexpected {op.name}")
        return True

    def _uncached(self, task_id: int, missing: list[bytes]) -> None:
        """Evicted, held before a restart, or never arrived: the client sends the task again with them."""
        self.decisions.uncached(task_id)
        self.post(*op_parts(Op.UNCACHED, task_id, *missing))

    async def _once_arrived(self, task_id: int, wanted: tuple[list[bytes], list[Blob], list[bytes]],
                            data: memoryview, shared: tuple[int, int] | None) -> None:
        values, missing = await self.blobs.awaited(*wanted)
        if missing:
            self._uncached(task_id, missing)
        else:
            with suppress(trio.ClosedResourceError):  # the client ended the lease meanwhile: it requeues it
                self.send_tasks.send_nowait((task_id, data, shared, values))

    async def _time_is_up(self) -> None:
        await trio.sleep(self.decisions.lease_seconds)
        self.post()

    async def _heartbeat(self) -> None:
        who = self.daemon.config.who
        while True:
            await trio.sleep(HEARTBEAT_SECONDS)
            self.channel.framed.check_silence()
            if not who.keyring.allows(self.client, self.client_key):  # the owner took them out
                raise ProtocolError(f"{self.client} is no longer a member of {who.cluster}")
            self.post(encode_op(Op.PING))
