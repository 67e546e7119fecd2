"""The hop between a worker daemon and its task processes: a Unix socket, plus shared memory for big data.

Each message is a header ``(kind, offset, size)``.  An INLINE message's
``size`` bytes follow on the socket.  A SHARED message carries one file
descriptor (SCM_RIGHTS) of a sealed memfd holding the data at
``offset``: a big task payload is decrypted by the daemon and written
into such a memfd, sealed against writes once whole (:func:`sealed_fd`),
and read in place by the task process, and a big outcome is
written by the task process into one that the daemon sends from.  No
pipe copies, no second buffer of the size of the payload.  Where there
is no memfd or no SCM_RIGHTS (macOS, Windows, ``P2PEXEC_PORTABLE=1``:
:func:`shared`), everything goes INLINE.

A task process may precede an outcome with REPORT messages: a small
JSON object saying which function it is about to run (``fn``, only when
it changed), that the task raised (``ok``: false), for the worker's
history, or that it went past its memory limit (``over``: ``memory``,
after which it exits); the daemon reads them without unpickling anything.
The daemon may precede a task with a LIMIT message: ``size`` is the
address space the task process allows itself from then on (0: as much
as its hard limit); and with VALUE messages, one per big value the task
refers to, in order (:mod:`p2pexec.protocol.values`): with a memfd, the
value lies at ``offset`` in it, else its ``size`` bytes follow inline.
The daemon may send several tasks at once (short ones, in one write);
a SKIP message withdraws the one numbered ``offset`` (counting from 0 in
this process) if it has not started: the task process then sends a
REPORT ``skipped`` naming it, at once (while another task runs), and no
outcome for it; a task that had started answers as usual.

A task process writes a big outcome into the memfd of its last one when
the daemon is done with that (:class:`Outcomes`): the daemon numbers the
SHARED outcomes of a process as they come (0, 1, ...) and, before the
next task it sends, sends a RELEASED message (``offset``: the number) for
each it no longer has a view of (:class:`Releases`).  Such a memfd is
sealed against resizing only, not writing: the daemon forwards an
outcome and reads nothing in it, so a task process that changes one
while it is sent changes only its own member's result.

A task process's fd 1 and 2 are files the daemon made and keeps open:
what the task prints goes there (its start, and all a subprocess
writes), so the daemon can send it with the error when the process dies
mid-task (:func:`kept_output`).

The daemon trusts nothing a task process sends: a shared outcome must be
a memfd sealed against shrinking (so the daemon's mapping can never
fault) and large enough for what the header claims.

Used by the daemon and by the task process, so it imports neither trio
nor dill.
"""

from __future__ import annotations

import functools
import json
import logging
import mmap
import os
import stat
import struct
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from .. import portability
from ..protocol.frames import Buffer

log = logging.getLogger("p2pexec.worker")

HEADER = struct.Struct(">BQQ")
OUTPUT_KEPT = 1 << 20  # characters (bytes, in the output files) kept of each stream's start, and as many of its end


def kept_output(fd: int) -> str:
    """What was written to the file ``fd``: its start and its end, if that is more than it keeps."""
    size = os.fstat(fd).st_size
    if size <= 2 * OUTPUT_KEPT:
        return os.pread(fd, size, 0).decode(errors="replace")
    return (os.pread(fd, OUTPUT_KEPT, 0).decode(errors="replace") + dropped_note(size - 2 * OUTPUT_KEPT)
            + os.pread(fd, OUTPUT_KEPT, size - OUTPUT_KEPT).decode(errors="replace"))


def dropped_note(count: int) -> str:
    return f"\n[p2pexec: {count} characters of this task's output were dropped here; it printed more than it keeps]\n"
INLINE, SHARED, REPORT, LIMIT, VALUE, SKIP, RELEASED = 0, 1, 2, 3, 4, 5, 6
MAX_REPORT = 1024  # bytes of one REPORT
SHARED_MIN = 1 << 20  # smaller data is cheaper to copy through the socket
SPARE_SECONDS = 5.0  # a task process keeps its last big outcome's memfd this long for the next
LENT_SECONDS = 60.0  # and one the daemon still sends from (over a slow uplink) this long


@dataclass(frozen=True)
class Report:
    """What a REPORT says, read without trusting it: anything malformed is ignored."""

    fn: str | None = None  # the function the task runs (only shown, as text)
    raised: bool = False
    missing: str | None = None  # a module the task could not be loaded without
    over_memory: bool = False
    skipped: int | None = None  # a notice: this task (by number) was skipped, as asked, and never runs

    @classmethod
    def parse(cls, data: bytes | bytearray) -> "Report":
        try:
            fields = json.loads(data)
        except ValueError:
            fields = None
        if not isinstance(fields, dict):
            return cls()
        fn, missing, skipped = fields.get("fn"), fields.get("missing"), fields.get("skipped")
        return cls(fn=fn if isinstance(fn, str) else None,
                   raised=fields.get("ok") is False,
                   missing=missing if isinstance(missing, str) and missing.isidentifier() and len(missing) <= 100
                   else None,
                   over_memory=fields.get("over") == "memory",
                   skipped=skipped if type(skipped) is int else None)


try:
    import fcntl

    _SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
except (ImportError, AttributeError):  # no fcntl (Windows) or no seals (macOS): no memfd, nothing below runs
    _SEALS = 0


def shared() -> bool:
    """Can big data hop through a sealed memfd here?  Else it goes inline."""
    return portability.memfd() and portability.fd_passing()


class SharedMemory(mmap.mmap):
    """A sealed memfd's read-only mapping, which task processes can be given (:attr:`fd`).  Written
    through the file (:meth:`write_at`, a :class:`~p2pexec.protocol.frames.WrittenThrough`): new shared
    memory written through a mapping faults in page by page, which made a 256 MiB value arrive 0.07 s
    later."""

    fd: int

    def write_at(self, offset: int, data: Buffer) -> None:
        _write_at(self.fd, offset, data)


def _write_at(fd: int, offset: int, data: Buffer) -> int:
    """Write all of ``data`` at ``offset`` of ``fd``; where it ends."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
    return offset


def allocate(size: int) -> SharedMemory | bytearray:
    """A buffer in a sealed memfd that task processes can be given; freed with its last view.

    Where memfds cannot hop (:func:`shared`), a plain bytearray.
    """
    if not shared():
        return bytearray(size)
    fd = _sized_memfd("p2pexec-data", size)
    try:
        # written only through the file; private, so that no mapping could write and the seal is allowed
        buffer = SharedMemory(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    except BaseException:
        os.close(fd)
        raise
    buffer.fd = fd
    weakref.finalize(buffer, os.close, fd)
    return buffer


def _sized_memfd(name: str, size: int) -> int:
    """A new memfd of ``size`` bytes, sealed against resizing (a mapping of it can never fault)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def sealed_fd(owner: object) -> int | None:
    """The memfd behind a whole message's buffer made by :func:`allocate` (e.g. ``view.obj``), sealed
    against writes from now on; None for other buffers, and where it cannot be sealed (the message then
    goes to its task process inline).  A task process given it maps it privately, and could otherwise
    write to the file: change a cached value under its name for its member's later tasks."""
    if not isinstance(owner, SharedMemory):
        return None
    try:
        fcntl.fcntl(owner.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    except OSError as exc:
        _unsealable(exc.errno)
        return None
    return owner.fd


@functools.cache
def _unsealable(errno: int) -> None:  # (said once for each reason)
    log.warning("could not seal a task's shared memory against writes (%s): big messages go to task "
                "processes through their socket instead, a copy each", os.strerror(errno))


def map_outcome(fd: int, offset: int, size: int) -> memoryview:
    """Map a task process's shared outcome read-only, after checking it cannot change size under us."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise ValueError("the shared outcome is not a memory file")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise ValueError("the shared outcome is not a sealable memory file") from None
    if seals & _SEALS != _SEALS:
        raise ValueError("the shared outcome is not sealed against resizing")
    if size == 0 or offset + size > info.st_size:
        raise ValueError(f"the shared outcome claims {size} bytes at {offset} of a {info.st_size}-byte file")
    buffer = mmap.mmap(fd, info.st_size, prot=mmap.PROT_READ)
    return memoryview(buffer)[offset : offset + size]


class Outcomes:
    """The task process's memfds for its big outcomes: the last one is written again for the next that
    fits (half its size or more) once the daemon has let it go (RELEASED), and dropped SPARE_SECONDS
    after that if no outcome went in it meanwhile (:meth:`expire`).  New shared memory is dear to write
    (0.10 s for 256 MiB here, 0.05 s again); it is only ever this process's, so only its own member's
    outcomes are written in it.  (Unmapped here, it counts in no limit of the task process: hence the
    short keep.)"""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # (the inbox's thread reads RELEASED and expires the memfd)
        self.sent = 0  # shared outcomes sent so far: the daemon numbers them alike
        self._fd = -1
        self._size = 0
        self._lent: int | None = None  # the number the memfd went out with, until the daemon lets it go
        self._used = 0.0  # when an outcome last went in it, or the daemon let it go (time.monotonic)

    def share(self, parts: Sequence[Buffer], size: int) -> int:
        """A memfd holding the outcome, to send as the next shared outcome (the caller closes it)."""
        with self.lock:
            try:
                if not (self._fd >= 0 and self._lent is None and size <= self._size <= 2 * size):
                    self._close()
                    self._fd, self._size = _sized_memfd("p2pexec-outcome", size), size
                offset = 0
                for part in parts:
                    offset = _write_at(self._fd, offset, part)
                fd = os.dup(self._fd)
            except BaseException:
                self._close()
                raise
            self._lent, self.sent, self._used = self.sent, self.sent + 1, time.monotonic()
            return fd

    def released(self, number: int) -> None:
        with self.lock:
            if number == self._lent:
                self._lent, self._used = None, time.monotonic()

    @property
    def spare(self) -> bool:
        return self._fd >= 0

    def expire(self) -> None:
        """Let the memfd go SPARE_SECONDS after the daemon let it go, or LENT_SECONDS after it went out if
        the daemon still has it (its mapping lives on until it lets it go too); not while one is written."""
        if self._stale() and self.lock.acquire(blocking=False):
            try:
                if self._stale():
                    self._close()
            finally:
                self.lock.release()

    def _stale(self) -> bool:  # (asked every 10 ms while a task runs: cheap when there is no memfd)
        return self.spare and time.monotonic() - self._used >= (SPARE_SECONDS if self._lent is None else LENT_SECONDS)

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._size, self._lent = -1, 0, None


class Releases:
    """The daemon's side: numbers one task process's shared outcomes as they come, and says which it has
    let go of (no view of it left) before the next task, so that the process may write in it again."""

    def __init__(self) -> None:
        self._count = 0
        self._let_go: list[int] = []  # (appended to by finalizers, whenever a mapping's last view goes)

    def track(self, view: memoryview) -> memoryview:
        weakref.finalize(view.obj, self._let_go.append, self._count)
        self._count += 1
        return view

    def notices(self) -> bytes:
        if not self._let_go:  # (before every batch of tasks: most have nothing to say)
            return b""
        numbers = self._let_go[:]
        del self._let_go[: len(numbers)]
        return b"".join(HEADER.pack(RELEASED, number, 0) for number in numbers)


def map_payload(fd: int, offset: int, size: int) -> memoryview:
    """A task process's private, writable view of a shared payload (copy-on-write: the daemon's stays intact)."""
    length = os.fstat(fd).st_size
    if offset + size > length:
        raise ValueError(f"the shared payload claims {size} bytes at {offset} of a {length}-byte file")
    buffer = mmap.mmap(fd, length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return memoryview(buffer)[offset : offset + size]
