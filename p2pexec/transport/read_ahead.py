"""Read a TCP connection ahead, so one socket read serves a whole Noise message (or several).

py-libp2p 0.8.1 reads each Noise message with two socket reads, its 2-byte
length then its body, and every successful socket read of trio is also a
turn of its loop; the body was nearly always there already, and in a
burst the next message too (chunksize-1 maps cost about 7% less CPU
without those reads, ``benchmarks/README.md``).  Here
``TrioTCPStream.read`` asks the socket for at least :data:`READ_AHEAD`
bytes and keeps what the caller did not ask for; the next read is served
from it without a system call or a turn of the loop.

Everything py-libp2p reads from a TCP connection (multistream-select, the
Noise handshake, then Noise messages) goes through that one method of that
one object, so the bytes kept are always read next, in order, whoever reads
them.  ``tests/test_libp2p_host.py`` checks what this relies on.
"""

from __future__ import annotations

from typing import Any

from libp2p.io.trio import TrioTCPStream

READ_AHEAD = 1 << 16  # a socket read asks for at least this much; trio's own default read size

_read = TrioTCPStream.read


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


def read_ahead() -> None:
    """Install the read-ahead on py-libp2p's TrioTCPStream (idempotent)."""
    TrioTCPStream.read = _read_ahead  # type: ignore[method-assign]
