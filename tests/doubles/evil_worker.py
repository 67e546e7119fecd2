"""A worker that breaks the lease protocol on purpose, to test that clients drop it.

    python evil_worker.py MODE <p2pexec-worker arguments>

It joins the board and offers its slot like a real worker, and runs the
task; then, per MODE, its answer is ``tamper``ed (one bit of ciphertext
flipped), ``garbage`` (random bytes in place of the sealed frame) or
``wrong-id`` (a result for a task the client never sent).  ``bogus-addrs``
offers its slot honestly but at addresses where nobody listens (loopback
ports that refuse, and a circuit through a relay that does not exist).
``silent`` takes tasks and heartbeats but never answers one, interrupted
or not.  ``huge-claim`` answers a task with the first chunk of a result it
claims is ``$EVIL_CLAIM`` bytes, then sends nothing more.  ``crafted-pickle``
answers with a pickle that, when unpickled, calls ``$EVIL_CALL`` (``system``:
touch ``$EVIL_MARKER``; ``exit``: ``os._exit(13)``; ``memmap``: write
``$EVIL_MARKER`` through ``numpy.memmap``, once the client has sent a NumPy
function) or changes a class (``mutate``: ``pathlib.PurePath.__fspath__``).
"""

from __future__ import annotations

import os
import pickle
import sys

from p2pexec import worker_cli
from p2pexec.protocol.frames import _FIRST, _OP, _TOTAL, LENGTH, Op, op_parts, pack_parts
import trio

from p2pexec.transport import nat
from p2pexec.worker import daemon, slots

MODE = sys.argv.pop(1)


class _Crafted:
    def __reduce__(self):
        call = os.environ["EVIL_CALL"]
        if call == "exit":
            return os._exit, (13,)
        if call == "memmap":  # numpy.memmap(path, "uint8", "w+", 0, (5,)), then [:] = b"pwned" through SETITEMS
            import numpy

            return (numpy.memmap, (os.environ["EVIL_MARKER"], "uint8", "w+", 0, (5,)), None, None,
                    iter([(slice(None), list(b"pwned"))]))
        return os.system, (f"touch {os.environ['EVIL_MARKER']}",)


def _crafted() -> bytes:
    if os.environ["EVIL_CALL"] == "mutate":  # BUILD on a class: setattr(pathlib.PurePath, "__fspath__", "evil")
        return b"\x80\x04cpathlib\nPurePath\nN}\x8c\x0a__fspath__\x8c\x04evils\x86b."
    return pickle.dumps(_Crafted(), protocol=5)


def _misbehave(channel) -> None:
    framed_send, framed_send_frame, channel_send = channel.framed.send, channel.framed.send_frame, channel.send
    sealed = 0

    if MODE == "crafted-pickle":
        async def craft(parts, final=False) -> None:
            if not isinstance(parts, (bytes, bytearray, memoryview)) and len(parts[0]) == _OP.size \
                    and parts[0][0] == Op.RESULT:
                task_id = _OP.unpack(parts[0])[1]
                crafted = b"".join(bytes(p) for p in pack_parts([_crafted()]))
                parts = op_parts(Op.RESULT, task_id, crafted)
            await channel_send(parts, final)

        channel.send = craft
        return

    if MODE == "huge-claim":
        async def claim(parts, final=False) -> None:
            head = parts if isinstance(parts, (bytes, bytearray, memoryview)) else parts[0]
            if len(head) >= _OP.size and head[0] == Op.RESULT:
                claimed = int(os.environ["EVIL_CLAIM"])
                first = (bytes([_FIRST]) + _TOTAL.pack(claimed)
                         + _OP.pack(Op.RESULT, _OP.unpack_from(head)[1], claimed - _OP.size) + b"x" * 65536)
                await framed_send(channel._sealer.seal(first))
                await trio.sleep_forever()  # the rest never comes
            await channel_send(parts, final)

        channel.send = claim
        return

    async def send_frame(frame) -> None:  # length prefix, then the sealed chunk
        nonlocal sealed
        sealed += 1
        frame = bytearray(frame)
        if sealed > 1:  # the first message, the initial credit, is honest: the client sends a task
            if MODE == "tamper":
                frame[len(frame) // 2] ^= 1
            elif MODE == "garbage":
                frame[LENGTH.size:] = os.urandom(len(frame) - LENGTH.size)
        await framed_send_frame(frame)

    async def send_message(parts, final=False) -> None:
        if MODE == "wrong-id" and not isinstance(parts, (bytes, bytearray, memoryview)):
            parts = [_OP.pack(Op.RESULT, _OP.unpack(p)[1] + 1000, _OP.unpack(p)[2])
                     if len(p) == _OP.size and p[0] == Op.RESULT else p for p in parts]
        await channel_send(parts, final)

    channel.framed.send_frame, channel.send = send_frame, send_message


class EvilDaemon(daemon.WorkerDaemon):
    async def _serve_lease(self, channel, *args) -> None:
        _misbehave(channel)
        await super()._serve_lease(channel, *args)


BOGUS = ["/ip4/127.0.0.1/tcp/1", "/ip4/127.0.0.2/tcp/1",
         "/ip4/127.0.0.1/tcp/2/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA/p2p-circuit"]

async def _never(self):
    with trio.CancelScope(shield=True):  # not even INTERRUPT ends it
        await trio.sleep_forever()


if MODE == "bogus-addrs":
    nat.NatTraversal.addrs_for = lambda self, theirs: BOGUS
elif MODE == "silent":
    slots.TaskSlot.outcome = _never  # (the task process runs the task; no answer ever comes back)
else:
    daemon.WorkerDaemon = EvilDaemon  # serve() builds its daemon from this name
sys.exit(worker_cli.main())
