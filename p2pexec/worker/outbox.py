"""What one lease says to its client: answers gathered into messages, with what the lease's decisions add
(credit that refills the client's window, tasks returned, the final END).

One sender drains the outbox: whatever was posted while the previous message was being written leaves in
the next one.  The small answers of a lease's only running batch need not wait for that sender's turn of
the loop: the batch may carry them (:meth:`Outbox.carry`) and send them itself as it ends
(:meth:`Outbox.send`); a post meanwhile hands everything to the sender again.  END goes out once, in
whichever message the lease's decisions end first, and nothing is written after it: a second END would
be written while the lease is being cancelled, cut off halfway through its Noise message, and that
breaks the whole connection underneath.
"""

from __future__ import annotations

import time

import trio

from ..protocol.frames import Buffer, Op, encode_op, nbytes, op_parts
from ..transport.channel import SecureChannel
from ..transport.tcp_stream import AT_ONCE
from .lease_decisions import GATHER_SECONDS, LeaseDecisions


class Outbox:
    """The lease's outgoing messages; :meth:`run` is its sender, and returns once END is sent."""

    def __init__(self, channel: SecureChannel, decisions: LeaseDecisions) -> None:
        self.channel = channel
        self.decisions = decisions
        self.ops: list[Buffer] = []  # answers (and RETURNED, CANCELLED...) for the next message
        self.mail = trio.Event()  # the outbox has news: wake the sender
        self.carried = False  # ops wait for the batch that carries them, not for the sender
        self.ended = False  # END is written (or being written): nothing more is

    def post(self, *op: Buffer) -> None:
        """Queue ``op`` for the sender (which then takes everything, held answers too)."""
        self.ops.extend(op)
        self.carried = False
        self.mail.set()

    def carry(self, ops: list[Buffer]) -> bool:
        """Queue ``ops`` for the caller to :meth:`send` without a turn of the sender, if they are small (the
        write cannot hold the caller's slot up), nothing else waits to go or is being written, and the
        sender would not gather more first; False: the caller posts them instead."""
        if self.ops or self.channel.sending or sum(nbytes(op) for op in ops) > AT_ONCE \
                or self.decisions.gathering(len(ops)):
            return False
        self.ops.extend(ops)
        self.carried = True
        return True

    async def send(self) -> bool:
        """Send what is queued, with what the lease decides to add; True if this sent END (then the caller
        ends the lease; a send after it writes nothing and returns False)."""
        self.carried = False
        if self.ended:
            return False
        mail = self.decisions.mail(trio.current_time(), time.time())
        self.ended = mail.end
        for task_id in mail.returned:
            self.ops.extend(op_parts(Op.RETURNED, task_id))
        batch, self.ops[:] = self.ops[:], []
        if mail.end:
            batch.append(encode_op(Op.END))
        elif mail.credit:
            batch.append(encode_op(Op.CREDIT, mail.credit))
        if batch:
            await self.channel.send(batch)
        del batch
        return mail.end

    async def run(self) -> None:
        decisions = self.decisions
        while True:
            await self.mail.wait()
            self.mail = trio.Event()
            if decisions.gathering(len(self.ops)):
                with trio.move_on_after(GATHER_SECONDS):
                    while decisions.gathering(len(self.ops)):
                        await self.mail.wait()
                        self.mail = trio.Event()
            if await self.send():
                return
