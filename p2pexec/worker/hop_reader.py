"""The daemon's side of the hop, read ahead: one socket read serves every message already there.

A task process answers each task with one write (a header, then the
outcome inline; a REPORT before it now and then).  Read a header, then a
body, that was two socket calls per task, each a turn of trio's loop; a
batch's answers, queued while the daemon was busy, came out one read at a
time.  Here one read takes whatever is there, up to :data:`READ_SIZE`.

File descriptors complicate a read ahead, and this is where they are
checked.  A task process sends a SHARED header's memfd with that header
alone (``socket.send_fds``), and Linux ends a read on a stream socket
right after the bytes that carried descriptors: so the descriptors of a
read belong to the header its last byte falls in.  Descriptors that land
anywhere else (with a body, or two reads' worth before a header took the
first) break the hop (:class:`HopBroken`), and are closed, never used.

Reads and writes go to the socket at once, and through trio's loop only
when it would block (:func:`nonblocking_call`): the task process usually
answered while the daemon was still sending it the task, and a checkpoint
after each call was a turn of the loop per task for nothing.
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from .hop import HEADER

T = TypeVar("T")

READ_SIZE = 1 << 16  # bytes one read asks for: dozens of small outcomes
MAX_FDS = 4  # room for more file descriptors than a well-behaved task process sends, to close the extras


class HopBroken(Exception):
    """The task process sent file descriptors where the hop has none."""


async def nonblocking_call(sock: socket.socket, op: Callable[[], T], writing: bool = False) -> T:
    """``op()`` on the non-blocking ``sock`` now, a wait in trio's loop only while it would block; raises
    Cancelled first if the task was cancelled, as trio's socket methods do."""
    await trio.lowlevel.checkpoint_if_cancelled()  # (yields only when cancelled)
    while True:
        try:
            return op()
        except BlockingIOError:
            if writing:
                await trio.lowlevel.wait_writable(sock.fileno())
            else:
                await trio.lowlevel.wait_readable(sock.fileno())


async def send_all(sock: socket.socket, data: Any) -> None:
    """Write all of ``data`` (a buffer) to the non-blocking ``sock``; the loop turns between the writes of a
    big one, as it does between the reads of a big outcome."""
    with memoryview(data) as view:
        view = view.cast("B")
        while view:
            view = view[await nonblocking_call(sock, lambda: sock.send(view), writing=True) :]
            if view:
                await trio.lowlevel.checkpoint()


def close(sock: socket.socket) -> None:
    """Close ``sock``, waking the tasks that wait on it (with ClosedResourceError, as trio's sockets do)."""
    trio.lowlevel.notify_closing(sock.fileno())
    sock.close()


class HopReader:
    """Reads a task process's answers from ``sock``, a non-blocking stdlib socket that trio also knows."""

    def __init__(self, sock: socket.socket, fd_passing: bool) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._fd_passing = fd_passing
        self._buf = bytearray()
        self._fds: list[int] = []  # came with the read that ended at ``_fds_end`` of ``_buf``
        self._fds_end = 0

    async def header(self) -> tuple[tuple[int, int, int], list[int]] | None:
        """The next header (kind, offset, size) and the descriptors sent with it; None if the process hung up."""
        while len(self._buf) < HEADER.size:
            if not await self._fill():
                return None
        fields = HEADER.unpack_from(self._buf)
        fds: list[int] = []
        if self._fds and self._fds_end <= HEADER.size:
            fds, self._fds = self._fds, []
        self._consume(HEADER.size)
        return fields, fds

    async def body(self, out: memoryview) -> bool:
        """Fill ``out`` with the bytes that follow; False if the process hung up first."""
        held = min(len(out), len(self._buf))
        out[:held] = self._buf[:held]
        self._consume(held)
        out = out[held:]
        while out:  # a big outcome: straight into its buffer (any descriptor the kernel drops and closes)
            await trio.lowlevel.checkpoint()  # (one big read is many: the loop turns between them)
            count = await nonblocking_call(self._sock, lambda: self._sock.recv_into(out))
            if not count:
                return False
            out = out[count:]
        return True

    def close(self) -> None:
        """Close the descriptors received and not handed out."""
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    async def _fill(self) -> bool:
        sock = self._sock
        if not self._fd_passing:  # no SCM_RIGHTS: every outcome comes inline
            data, fds = await nonblocking_call(sock, lambda: sock.recv(READ_SIZE)), []
        else:
            room = socket.CMSG_SPACE(MAX_FDS * 4)
            data, ancillary, _, _ = await nonblocking_call(sock, lambda: sock.recvmsg(READ_SIZE, room))
            fds = received_fds(ancillary)
        if fds:
            if self._fds:  # the first ones were never claimed by a header
                self.close()
                for fd in fds:
                    os.close(fd)
                raise HopBroken("the task process sent file descriptors with no header to take them")
            self._fds, self._fds_end = fds, len(self._buf) + len(data)
        self._buf += data
        return bool(data)

    def _consume(self, count: int) -> None:
        del self._buf[:count]
        self._fds_end -= count
        if self._fds and self._fds_end <= 0:  # they came with bytes that were not a header
            self.close()
            raise HopBroken("the task process sent file descriptors with the body of a message")


def received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)
