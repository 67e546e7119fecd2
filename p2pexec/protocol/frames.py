"""Data-plane framing and lease operations, without I/O (their encryption: :mod:`.sealing`).

Wire layout of a lease stream (client dials the worker it accepted)::

    client -> worker   frame: the signed ``accept`` board line (plaintext inside Noise)
    both directions    frame: 25-byte channel header (hardware AES or not, a random nonce prefix)
    both directions    frames: sealed chunks of lease operations (final flag, ciphertext, MAC)
    each direction     last frame has its final flag set; EOF before it is truncation

A frame is a 4-byte big-endian length and that many bytes.  A logical
message (a batch of lease operations) larger than :data:`CHUNK` is split
over several sealed chunks, the first announcing the total, so the
receiver fills one buffer of the right size and memory stays bounded by
the chunk size on the sending side.
"""

from __future__ import annotations

import enum
import mmap
import struct
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, Union

from ..errors import ProtocolError

LENGTH = struct.Struct(">I")
_OP = struct.Struct(">BQQ")  # op, arg, data length: ops are self-delimiting, several fit in one message
OP_HEADER_BYTES = _OP.size


Buffer = Union[bytes, bytearray, memoryview]
Writable = Union[bytearray, memoryview, mmap.mmap]  # what a message may be reassembled into
CHUNK = 1 << 20
MAX_FRAME = CHUNK + 1024  # a sealed chunk: plaintext, kind and length header, tag
MAX_MESSAGE = 1 << 40
_SINGLE, _FIRST, _MORE, _LAST = 0, 1, 2, 3
_SINGLE_HEAD = bytes([_SINGLE])
_TOTAL = struct.Struct(">Q")


def nbytes(buffer: Buffer) -> int:
    return len(buffer) if type(buffer) is bytes else memoryview(buffer).nbytes


def chunk_pieces(parts: Sequence[Buffer], size: int = CHUNK) -> Iterator[list[Buffer]]:
    """The chunks that carry one logical message made of ``parts``: each its kind header and views of
    ``parts``, not joined (:meth:`Sealer.seal_frame` copies them once, into the frame)."""
    total = sum(nbytes(p) for p in parts)
    if total <= size:
        yield [_SINGLE_HEAD, *parts]
        return
    views = [memoryview(p).cast("B") for p in parts]
    pieces: list[Buffer] = []
    room, sent, first = size, 0, True
    for view in views:
        while view.nbytes:
            take = view[:room]
            pieces.append(take)
            view, room, sent = view[take.nbytes :], room - take.nbytes, sent + take.nbytes
            if room == 0 or sent == total:
                head = bytes([_FIRST]) + _TOTAL.pack(total) if first else bytes([_LAST if sent == total else _MORE])
                yield [head, *pieces]
                pieces, room, first = [], size, False


class MessageTooLarge(ProtocolError):
    """The peer announced a message over our limit; ``head`` is what came of it, to tell which task it was."""

    def __init__(self, total: int, limit: int, head: memoryview) -> None:
        super().__init__(f"peer announced a {total}-byte message, over the {limit}-byte limit")
        self.total, self.limit, self.head = total, limit, head

    def culprit(self) -> tuple[Op, int, int] | None:
        """(op, arg, claimed size) of the operation that runs past the first chunk: the big one."""
        view, offset = self.head, 0
        while view.nbytes - offset >= _OP.size:
            code, arg, n = _OP.unpack_from(view, offset)
            offset += _OP.size + n
            if offset > view.nbytes:
                try:
                    return Op(code), arg, n
                except ValueError:
                    return None
        return None


class Reassembler:
    """Rebuilds logical messages from their chunks; anything out of order is an error.

    ``allocate(size)`` makes the buffer a chunked message is rebuilt in (a
    worker puts it in memory its task processes can read in place, a
    client :class:`Recycled` memory).  With ``allocate=None`` it is private
    anonymous memory that the system commits page by page as chunks fill
    it, so a peer that announces more than it sends costs no more memory
    than it sent.

    A chunk after the first may be decrypted straight into the buffer
    (:meth:`place`, then :meth:`placed`, or :meth:`unplace` if it failed) instead of handed to
    :meth:`feed`.  A buffer with a ``write_at(offset, data)`` method (:class:`WrittenThrough`) is
    written through it instead, each chunk decrypted first into a buffer of the reassembler's own.
    """

    def __init__(self, max_message: int = MAX_MESSAGE, allocate: Callable[[int], Writable] | None = bytearray) -> None:
        self.max_message = max_message
        self._allocate = allocate or _untouched
        self._buf: Writable | None = None
        self._filled = 0
        self._total = 0
        self._kept = 0  # the byte a placed chunk's kind header lands on, until it is put back
        self._write_at: Callable[[int, Buffer], None] | None = None  # the buffer's, if it is WrittenThrough
        self._scratch = bytearray()  # where a chunk of such a buffer is placed (kept for the next)

    def feed(self, plaintext: Buffer) -> memoryview | None:
        if not plaintext:
            raise ProtocolError("empty channel message")
        kind, view = plaintext[0], memoryview(plaintext)[1:]
        if kind == _SINGLE and self._buf is None:
            return view
        if kind == _FIRST and self._buf is None:
            if view.nbytes < _TOTAL.size:
                raise ProtocolError("chunked message without its length")
            (total,) = _TOTAL.unpack_from(view)
            if total > self.max_message:
                raise MessageTooLarge(total, self.max_message, view[_TOTAL.size :])
            try:
                self._buf = self._allocate(total)
            except (MemoryError, OSError, ValueError):
                raise ProtocolError(f"no memory for the {total}-byte message the peer announced") from None
            self._write_at = getattr(self._buf, "write_at", None)
            self._filled, self._total = 0, total
            return self._append(view[_TOTAL.size :], last=False)
        if kind in (_MORE, _LAST) and self._buf is not None:
            return self._append(view, last=kind == _LAST)
        raise ProtocolError(f"unexpected chunk kind {kind}")

    def place(self, size: int) -> memoryview | None:
        """Where the next chunk's ``size`` plaintext bytes can be decrypted in place, or None to :meth:`feed` it.

        Within a message the next chunk is MORE or LAST: its one-byte kind
        lands on the last byte filled so far (kept aside, put back by
        :meth:`placed`), its data where it belongs; in a message written
        through its file, the chunk lands whole in the reassembler's own
        buffer.  A chunk that would run past the announced total gets no
        place: :meth:`feed` rejects it.
        """
        if self._buf is None or self._filled == 0 or not 0 < size <= self._total - self._filled + 1:
            return None
        if self._write_at is not None:
            if len(self._scratch) < size:
                self._scratch = bytearray(size)
            return memoryview(self._scratch)[:size]
        at = self._filled - 1
        self._kept = self._buf[at]
        return memoryview(self._buf)[at : at + size]

    def placed(self, size: int) -> memoryview | None:
        """The chunk of ``size`` bytes is in the place :meth:`place` gave: check its kind, as :meth:`feed` would."""
        assert self._buf is not None
        at, through = self._filled - 1, self._write_at is not None
        if through:
            kind = self._scratch[0]
        else:
            kind, self._buf[at] = self._buf[at], self._kept
        if kind not in (_MORE, _LAST):
            raise ProtocolError(f"unexpected chunk kind {kind}")
        if through:
            self._write(memoryview(self._scratch)[1:size])
        self._filled = at + size
        return self._done() if kind == _LAST else None

    def rest(self) -> None:
        """Between messages (see :meth:`Recycled.rest`)."""
        if self._buf is None and isinstance(self._allocate, Recycled):  # (never one being rebuilt)
            self._allocate.rest()

    def unplace(self) -> None:
        """The chunk meant for :meth:`place`'s place did not open: put back the byte its kind header covered."""
        assert self._buf is not None
        if self._write_at is None:  # (else the place was a buffer of its own)
            self._buf[self._filled - 1] = self._kept

    def _append(self, view: memoryview, last: bool) -> memoryview | None:
        assert self._buf is not None
        end = self._filled + view.nbytes
        if end > self._total:
            raise ProtocolError("chunked message longer than announced")
        if self._write_at is not None:
            self._write(view)
        else:
            self._buf[self._filled : end] = view
        self._filled = end
        return self._done() if last else None

    def _write(self, data: Buffer) -> None:
        assert self._write_at is not None
        try:
            self._write_at(self._filled, data)
        except OSError as exc:  # (e.g. shared memory over its limit)
            raise ProtocolError(f"could not store the {self._total}-byte message the peer sent: {exc}") from None

    def _done(self) -> memoryview:
        if self._filled != self._total:
            raise ProtocolError("chunked message shorter than announced")
        out, self._buf, self._write_at = memoryview(self._buf), None, None  # type: ignore[arg-type]
        return out


class WrittenThrough(Protocol):
    """A message buffer best written through its file (``pwrite``), not its mapping: the first write to
    new shared memory through a mapping costs a page fault per 4 KiB (0.17 s for 256 MiB here), through
    the file the kernel adds the pages in bulk (0.10 s)."""

    def write_at(self, offset: int, data: Buffer) -> None:
        ...


class Recycled:
    """Private anonymous memory for big messages, the last one's used again for the next once nothing
    holds it; where :func:`.portability.lazy_free` says so (Linux, CPython).

    A first write to memory is dear (a page fault per 4 KiB, and on a VM
    the host's: 0.19 s for 256 MiB here), a rewrite is not (0.03 s).
    Between messages the last one's memory is kept if nothing has a view
    of it (a resize is refused while one lives), marked free (``MADV_FREE``):
    the system takes its pages back if it needs them, else they are there
    to rewrite (0.05 s).  So a result copied out of its message (``bytes``)
    leaves its memory to the next one; an array that lies in it keeps it.
    Until the system needs them, the kept pages still count in the
    process's RSS (as ``LazyFree``): one message's worth per lease at most.
    Every byte of a message is written before it is handed on, so none of
    the last one shows through.
    """

    advice = getattr(mmap, "MADV_FREE", 0)

    def __init__(self) -> None:
        self._last: mmap.mmap | None = None
        self._resting = False

    def __call__(self, size: int) -> mmap.mmap:
        last, self._last = self._last, None
        memory = last if last is not None and self._resting and _resized(last, size) else _untouched(size)
        self._last, self._resting = memory, False
        return memory

    def rest(self) -> None:
        """Keep the last message's memory if nothing holds it any more (else it is theirs: an array of a
        result may lie in it), marked free for the system to take back meanwhile."""
        last = self._last
        if last is None or self._resting:
            return
        if not _resized(last, len(last)):  # (refused while views of it live)
            self._last = None
            return
        try:
            last.madvise(self.advice)
        except OSError:  # (a kernel without it: kept, the memory could not be taken back)
            self._last = None
            return
        self._resting = True


_PRIVATE = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_ANONYMOUS") else {}


def _resized(memory: mmap.mmap, size: int) -> bool:
    try:
        memory.resize(size)
    except (BufferError, OSError, ValueError, SystemError):  # in use, or not resizable here
        return False
    return True


def _untouched(size: int) -> mmap.mmap:
    """Private anonymous memory (shared anonymous memory costs more to fault in: 0.27 s for 256 MiB here)."""
    return mmap.mmap(-1, size, **_PRIVATE)


def encode_frame(data: bytes) -> bytes:
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(data)} bytes exceeds the {MAX_FRAME}-byte limit")
    return LENGTH.pack(len(data)) + data


class FrameDecoder:
    """Reassembles frames from arbitrary chunks of a byte stream.

    What it is fed is kept as it came and each frame copied out once
    (a frame that is exactly one chunk, not at all): a big frame spans
    several reads, and one copy is what assembling it takes.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._parts: deque[memoryview] = deque()
        self._have = 0  # bytes in _parts
        self._size: int | None = None  # the length of the frame being read, once its prefix was

    def feed(self, data: bytes) -> Iterator[bytes]:
        if data:
            self._parts.append(memoryview(data if type(data) is bytes else bytes(data)))
            self._have += len(data)
        while True:
            if self._size is None:
                if self._have < LENGTH.size:
                    return
                (n,) = LENGTH.unpack(self._take(LENGTH.size))
                if n > self.max_frame:
                    raise ProtocolError(f"peer announced a {n}-byte frame, over the {self.max_frame}-byte limit")
                self._size = n
            if self._have < self._size:
                return
            frame, self._size = self._take(self._size), None
            yield frame

    def _take(self, n: int) -> bytes:
        """The next ``n`` bytes fed."""
        if not n:
            return b""
        self._have -= n
        first = self._parts[0]
        if first.nbytes == n and len(first.obj) == n:  # type: ignore[arg-type]
            self._parts.popleft()
            return first.obj  # type: ignore[return-value]
        pieces = []
        while n:
            part = self._parts.popleft()
            if part.nbytes > n:
                part, rest = part[:n], part[n:]
                self._parts.appendleft(rest)
            pieces.append(part)
            n -= part.nbytes
        return b"".join(pieces)

    @property
    def pending(self) -> int:
        return self._have + (0 if self._size is None else LENGTH.size)


class Op(enum.IntEnum):
    """Lease operations.  ``arg`` is a task id, or a count for CREDIT."""

    CREDIT = 1  # worker -> client: you may send ``arg`` more tasks
    TASK = 2  # client -> worker: run task ``arg``; data = dill payload
    RESULT = 3  # worker -> client: data = task outcome
    FAILED = 4  # worker -> client: data = UTF-8 reason the task process died
    END = 5  # either side: no more tasks on this lease
    BYE = 6  # plaintext of the final frame
    WITHDRAW = 7  # client -> worker: drop task ``arg`` unless it has started
    INTERRUPT = 8  # client -> worker: drop task ``arg``, or stop it by killing its task process
    CANCELLED = 9  # worker -> client: task ``arg`` was dropped or stopped as asked; no result follows
    PING = 10  # either side: still here (a quiet lease would look like a frozen or unplugged peer)
    MOVE = 11  # either side: my last message on this stream; the lease goes on where RESUME_MAGIC came
    RETURNED = 12  # worker -> client: task ``arg`` will not run here (the worker is stopping); run it elsewhere
    MISSING = 13  # worker -> client: task ``arg`` needs a module this worker lacks (data: its name); run it elsewhere
    BLOB = 14  # client -> worker: data = digest + a big value's payload, for task ``arg`` (next) and later ones
    TASK_WITH_VALUES = 15  # client -> worker: run task ``arg``; data = its values' digests (values.py), payload
    UNCACHED = 16  # worker -> client: task ``arg`` was not run, these values are not here (data: digests); send again
    SLOTS = 17  # worker -> client: the lease has ``arg`` slots now (it gave others to a more deserving request)


def op_parts(op: Op, arg: int = 0, *data: Buffer) -> list[Buffer]:
    """An operation as buffers to send as they are: big payloads are never copied into one."""
    return [_OP.pack(op, arg, sum(nbytes(d) for d in data)), *data]


def failed_data(reason: str, stdout: str = "", stderr: str = "") -> bytes:
    """FAILED's data: why the task process died, then (after a NUL) what the task had printed: the length of
    its stdout, its stdout, its stderr (clients before this read it all as the reason)."""
    data = reason.replace("\0", " ").encode()
    if stdout or stderr:
        out = stdout.encode(errors="backslashreplace")
        data += b"\0" + LENGTH.pack(len(out)) + out + stderr.encode(errors="backslashreplace")
    return data


def read_failed(data: Buffer) -> tuple[str, str, str]:
    """:func:`failed_data`'s reason, stdout and stderr, whatever a worker sent."""
    reason, _, rest = bytes(data).partition(b"\0")
    size = LENGTH.unpack_from(rest)[0] if len(rest) >= LENGTH.size else 0
    return tuple(part.decode(errors="replace")  # type: ignore[return-value]
                 for part in (reason, rest[LENGTH.size:LENGTH.size + size], rest[LENGTH.size + size:]))


def encode_op(op: Op, arg: int = 0, data: Buffer = b"") -> bytes:
    return b"".join(op_parts(op, arg, data))


def decode_ops(message: Buffer) -> Iterator[tuple[Op, int, memoryview, int]]:
    """The operations of one logical message, in order: op, arg, data (a view into it) and the data's offset."""
    view, offset, end = memoryview(message), 0, memoryview(message).nbytes
    while offset < end:
        if end - offset < _OP.size:
            raise ProtocolError("short lease operation")
        code, arg, n = _OP.unpack_from(view, offset)
        offset += _OP.size
        if n > end - offset:
            raise ProtocolError("lease operation longer than its message")
        try:
            op = Op(code)
        except ValueError:
            raise ProtocolError(f"unknown lease operation {code}") from None
        yield op, arg, view[offset : offset + n], offset
        offset += n


_COUNT = struct.Struct(">I")
_SIZE = struct.Struct(">Q")  # a part's entry: the zero bytes before it (top byte), then its size
_PAD_SHIFT = 56
ALIGN = 64  # where a payload laid out to land has each part after the first start (a cache line: any dtype's)
_ZEROS = memoryview(bytes(ALIGN))


def pack_header_size(count: int) -> int:
    """The bytes before the first of ``count`` parts in a payload :func:`pack_parts` makes."""
    return _COUNT.size + count * _SIZE.size


def pack_parts(parts: Sequence[Buffer], landing: int | None = None) -> list[Buffer]:
    """Several buffers as one payload: a count, their sizes, then the buffers themselves.

    With ``landing``, the payload will land that many bytes past an
    :data:`ALIGN`-aligned address, and each part after the first is
    preceded by the zero bytes that make it start aligned there (its entry
    says how many): an array in it can be used where it lies.
    """
    sizes = [nbytes(p) for p in parts]
    if landing is None or len(parts) < 2:  # nothing to place (every small task and result: few calls)
        return [_COUNT.pack(len(parts)) + b"".join(map(_SIZE.pack, sizes)), *parts]
    entries, out = [_SIZE.pack(sizes[0])], [parts[0]]
    at = landing + pack_header_size(len(parts)) + sizes[0]
    for part, size in zip(parts[1:], sizes[1:]):
        pad = -at % ALIGN
        entries.append(_SIZE.pack(pad << _PAD_SHIFT | size))
        out += [_ZEROS[:pad], part] if pad else [part]
        at += pad + size
    return [_COUNT.pack(len(parts)) + b"".join(entries), *out]


def unpack_parts(payload: Buffer) -> list[memoryview]:
    view = memoryview(payload).cast("B")
    if view.nbytes < _COUNT.size:
        raise ProtocolError("payload too short")
    (count,) = _COUNT.unpack_from(view)
    offset = _COUNT.size + count * _SIZE.size
    if count > 1 << 20 or view.nbytes < offset:
        raise ProtocolError("payload header is malformed")
    out = []
    for i in range(count):
        (entry,) = _SIZE.unpack_from(view, _COUNT.size + i * _SIZE.size)
        pad, size = entry >> _PAD_SHIFT, entry & ((1 << _PAD_SHIFT) - 1)
        if pad >= ALIGN:
            raise ProtocolError("payload part has too much padding")
        offset += pad
        if offset + size > view.nbytes:
            raise ProtocolError("payload part runs past its end")
        out.append(view[offset : offset + size])
        offset += size
    if offset != view.nbytes:
        raise ProtocolError("payload has trailing bytes")
    return out
