"""py-libp2p's TCP stream without its extra turns of trio's loop: read ahead, and small writes sent at once.

**Reads.** py-libp2p 0.8.1 reads each Noise message with two socket reads,
its 2-byte length then its body, and every successful socket read of trio
is also a turn of its loop; the body was nearly always there already, and
in a burst the next message too (chunksize-1 maps cost about 7% less CPU
without those reads, ``benchmarks/README.md``).  Here
``TrioTCPStream.read`` asks the socket for at least :data:`READ_AHEAD`
bytes and keeps what the caller did not ask for; the next read is served
from it without a system call or a turn of the loop.  Everything py-libp2p
reads from a TCP connection (multistream-select, the Noise handshake, then
Noise messages) goes through that one method of that one object, so the
bytes kept are always read next, in order, whoever reads them.

**Writes.** trio's ``send_all`` yields to the loop after a send that went
through, so every message costs its writer a second turn of the loop (an
epoll call and a task step: about 20 µs, on both ends of a round trip).
A writer that waits for something else right after its write (a lease's
:class:`~.channel.FramedStream`, whose sender then waits for credit or
news) says so with :data:`AT_ONCE_WRITER`; ``TrioTCPStream.write`` then
sends a message of up to :data:`AT_ONCE` bytes straight to the socket
under its write lock, after trio's cancellation check, and only what the
kernel did not take goes through trio's ``send_all``.  Any other writer,
and any bigger message, takes py-libp2p's path unchanged: a writer that
writes as it reads (an echo, a relay) must yield after each write, or it
answers a trickle of small reads with a trickle of small writes (a
pipelined 256 MiB echo ran at 56-440 MB/s that way, not 360-470).

``tests/test_libp2p_host.py`` checks what both rely on.
"""

from __future__ import annotations

import errno
from contextvars import ContextVar
from typing import Any

import trio
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.io.trio import TrioTCPStream

READ_AHEAD = 1 << 16  # a socket read asks for at least this much; trio's own default read size
AT_ONCE = 1 << 14  # a write of up to this many bytes goes to the socket without a turn of the loop
#: true in a task writing a message after which it waits for something else (see the module docstring)
AT_ONCE_WRITER: ContextVar[bool] = ContextVar("p2pexec_at_once_writer", default=False)

_read = TrioTCPStream.read
ORIGINAL_WRITE = TrioTCPStream.write


def _take(self: Any, n: int | None) -> bytes:
    kept: memoryview = self._kept
    end = len(kept) if n is None else min(len(kept), self._kept_at + n)
    taken = bytes(kept[self._kept_at:end])
    self._kept_at = end
    if end == len(kept):
        self._kept = None
    return taken


async def _read_ahead(self: Any, n: int | None = None) -> bytes:
    if getattr(self, "_kept", None) is not None:
        return _take(self, n)
    if n == 0:
        return b""
    data = await _read(self, READ_AHEAD if n is None else max(n, READ_AHEAD))
    if getattr(self, "_kept", None) is not None:  # a reader queued before us kept bytes that came first
        data = bytes(self._kept[self._kept_at:]) + data
    elif n is None or len(data) <= n:
        return data
    self._kept, self._kept_at = memoryview(data), 0
    return _take(self, n)


async def _write_at_once(self: Any, data: bytes) -> None:
    if len(data) > AT_ONCE or not AT_ONCE_WRITER.get():
        return await ORIGINAL_WRITE(self, data)
    async with self.write_lock:  # (a cancelled writer stopped before its frame was encrypted: _write_frame)
        stream: trio.SocketStream = self.stream
        try:
            sent = stream.socket._sock.send(data)  # type: ignore[attr-defined]  # the stdlib socket in trio's
        except (BlockingIOError, InterruptedError):  # (the rest waits in trio's send_all)
            sent = 0
        except OSError as error:  # as trio's send_all and py-libp2p's write would say it, without a second try
            if error.errno in (errno.EBADF, errno.ENOTSOCK):  # closed here: py-libp2p's write returns quietly
                return None
            raise ConnectionClosedError(f"TCP connection reset by remote peer: {error}", transport="tcp") from error
        if sent == len(data):
            return None
        try:  # the rest, still under the lock: no other write may come between
            await stream.send_all(memoryview(data)[sent:])
        except trio.BrokenResourceError as error:
            raise ConnectionClosedError(f"TCP connection reset by remote peer: {error}", transport="tcp") from error
        except trio.ClosedResourceError:  # closed here: py-libp2p's write returns quietly too
            return None
    return None


def install() -> None:
    """Put the read-ahead and the at-once writes on py-libp2p's TrioTCPStream (idempotent)."""
    TrioTCPStream.read = _read_ahead  # type: ignore[method-assign]
    TrioTCPStream.write = _write_at_once  # type: ignore[method-assign]
