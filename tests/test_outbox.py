"""The lease's outbox: one sender gathers answers into messages; a lease's only batch carries its answers out
itself, a turn of the loop sooner, unless anything else is posted meanwhile."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from p2pexec.protocol.frames import Op, decode_ops
from p2pexec.transport.tcp_stream import AT_ONCE
from p2pexec.worker.lease_decisions import LeaseDecisions
from p2pexec.worker.outbox import Outbox
from tests.test_worker_core import core, lease_of

pytestmark = pytest.mark.timeout(30)


class Wire:
    """Stands in for the lease's SecureChannel: records each message as its operations."""

    sending = False  # (SecureChannel's: a message being written; carry() asks)

    def __init__(self) -> None:
        self.messages: list[list[tuple[Op, int, bytes]]] = []

    async def send(self, batch: list[bytes]) -> None:
        message = memoryview(b"".join(bytes(b) for b in batch))
        self.messages.append([(op, arg, bytes(data)) for op, arg, data, _ in decode_ops(message)])


def answer(task: int) -> list[bytes]:
    from p2pexec.protocol.frames import op_parts

    return [bytes(b) for b in op_parts(Op.RESULT, task, b"outcome")]


def ran(decisions: LeaseDecisions, task: int) -> None:
    assert decisions.task_received(task) and decisions.task_started(task)
    decisions.task_answered(task, 0.5, clock=0.0)


def test_a_lone_batch_carries_its_answers_out_and_a_post_meanwhile_hands_them_to_the_sender():
    async def scenario() -> list[list[tuple[Op, int, bytes]]]:
        decisions = lease_of(core(slots=1), "bob", 1, now=0.0)
        wire = Wire()
        out = Outbox(wire, decisions)  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(out.run)
            out.post()  # the initial credit
            await trio.testing.wait_all_tasks_blocked()
            ran(decisions, 1)
            assert out.carry(answer(1)) and out.carried
            await trio.testing.wait_all_tasks_blocked()
            assert len(wire.messages) == 1  # the sender was not woken for it...
            assert not await out.send() and not out.carried  # ...the batch sends it, with the credit
            ran(decisions, 2)
            assert out.carry(answer(2))
            out.post(*answer(3))  # (say, a CANCELLED): the sender takes all, the batch then has nothing to send
            assert not out.carried
            await trio.testing.wait_all_tasks_blocked()
            assert not out.ops and not out.carry([bytes(AT_ONCE + 1)])  # a big answer: the sender writes it,
            wire.sending = True  # while the slot runs its next task; and so while another message is written
            assert not out.carry(answer(4))
            wire.sending = False
            out.ops.extend(answer(4))  # something waits to go: the answers of a batch queue behind it
            assert not out.carry(answer(5)) and out.ops == answer(4)
            nursery.cancel_scope.cancel()
        return wire.messages

    first, carried, posted = trio.run(scenario, clock=trio.testing.MockClock())
    assert [op for op, _, _ in first] == [Op.CREDIT]
    assert [op for op, _, _ in carried] == [Op.RESULT, Op.CREDIT] and carried[0][1] == 1
    assert [(op, arg) for op, arg, _ in posted][:2] == [(Op.RESULT, 2), (Op.RESULT, 3)]  # in order, one message


def test_end_goes_out_once_though_the_sender_wakes_while_a_batch_writes_it():
    """The lease ends in the carrying batch's message; a post during that write wakes the sender, which must
    write nothing more (a second END would be cut off by the lease's end, and break the connection)."""

    class SlowWire(Wire):
        async def send(self, batch: list[bytes]) -> None:
            await trio.sleep(0)  # a write that yields (a big answer, a full window)
            await super().send(batch)

    async def scenario() -> tuple[bool, list[list[tuple[Op, int, bytes]]]]:
        decisions = lease_of(core(slots=1), "bob", 1, now=0.0)
        wire = SlowWire()
        out = Outbox(wire, decisions)  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(out.run)
            out.post()
            await trio.testing.wait_all_tasks_blocked()
            ran(decisions, 1)
            decisions.finished = True  # (the client sent END, or the lease expired): this message ends it
            assert out.carry(answer(1))
            async def ping() -> None:  # (say, a heartbeat's) while the batch writes
                out.post()

            nursery.start_soon(ping)
            ended = await out.send()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()  # (what LeaseServer._ended does)
        return ended, wire.messages

    ended, messages = trio.run(scenario, clock=trio.testing.MockClock())
    ops = [op for message in messages for op, _, _ in message]
    assert ended and ops.count(Op.END) == 1 and ops[-1] is Op.END, messages
    assert ops == [Op.CREDIT, Op.RESULT, Op.END]
