"""Data-plane framing, encryption and lease operations, without I/O.

Wire layout of a lease stream (client dials the worker it accepted)::

    client -> worker   frame: the signed ``accept`` board line (plaintext inside Noise)
    both directions    frame: 24-byte secretstream header
    both directions    frames: secretstream ciphertexts of lease operations
    each direction     last frame carries TAG_FINAL; EOF before it is truncation

A frame is a 4-byte big-endian length and that many bytes.  A logical
message (a batch of lease operations) larger than :data:`CHUNK` is split
over several secretstream messages, the first announcing the total, so the
receiver fills one buffer of the right size and memory stays bounded by
the chunk size on the sending side.  Secretstream
(XChaCha20-Poly1305) makes altered, reordered, replayed or dropped frames
fail to decrypt, and the final tag makes truncation detectable, whatever
the stream underneath does on a reset.
"""

from __future__ import annotations

import enum
import hashlib
import mmap
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Union

import nacl.bindings as sodium
from nacl.exceptions import CryptoError

from ..errors import ProtocolError

LENGTH = struct.Struct(">I")
HEADER_BYTES = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES
_TAG_FINAL = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL
_OP = struct.Struct(">BQQ")  # op, arg, data length: ops are self-delimiting, several fit in one message


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


def chunk_message(parts: Sequence[Buffer], size: int = CHUNK) -> Iterator[bytes]:
    """The plaintexts that carry one logical message made of ``parts``."""
    total = sum(nbytes(p) for p in parts)
    if total <= size:
        yield b"".join([_SINGLE_HEAD, *parts])
        return
    views = [memoryview(p).cast("B") for p in parts]
    pieces: list[memoryview] = []
    room, sent, first = size, 0, True
    for view in views:
        while view.nbytes:
            take = view[:room]
            pieces.append(take)
            view, room, sent = view[take.nbytes :], room - take.nbytes, sent + take.nbytes
            if room == 0 or sent == total:
                head = bytes([_FIRST]) + _TOTAL.pack(total) if first else bytes([_LAST if sent == total else _MORE])
                yield b"".join([head, *pieces])
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
    worker puts it in memory its task processes can read in place).  With
    ``allocate=None`` the buffer grows as chunks arrive, so a peer that
    announces more than it sends costs no more memory than it sent.
    """

    def __init__(self, max_message: int = MAX_MESSAGE, allocate: Callable[[int], Writable] | None = bytearray) -> None:
        self.max_message = max_message
        self._allocate = allocate
        self._buf: Writable | None = None
        self._filled = 0
        self._total = 0

    def feed(self, plaintext: bytes) -> memoryview | None:
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
                self._buf = bytearray() if self._allocate is None else self._allocate(total)
            except (MemoryError, OSError):
                raise ProtocolError(f"no memory for the {total}-byte message the peer announced") from None
            self._filled, self._total = 0, total
            return self._append(view[_TOTAL.size :], last=False)
        if kind in (_MORE, _LAST) and self._buf is not None:
            return self._append(view, last=kind == _LAST)
        raise ProtocolError(f"unexpected chunk kind {kind}")

    def _append(self, view: memoryview, last: bool) -> memoryview | None:
        assert self._buf is not None
        end = self._filled + view.nbytes
        if end > self._total:
            raise ProtocolError("chunked message longer than announced")
        if self._allocate is None:
            self._buf += view  # type: ignore[operator]  # a growing bytearray
        else:
            self._buf[self._filled : end] = view
        self._filled = end
        if not last:
            return None
        if end != self._total:
            raise ProtocolError("chunked message shorter than announced")
        out, self._buf = memoryview(self._buf), None
        return out


def encode_frame(data: bytes) -> bytes:
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(data)} bytes exceeds the {MAX_FRAME}-byte limit")
    return LENGTH.pack(len(data)) + data


class FrameDecoder:
    """Reassembles frames from arbitrary chunks of a byte stream."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> Iterator[bytes]:
        self._buf += data
        while len(self._buf) >= LENGTH.size:
            (n,) = LENGTH.unpack_from(self._buf)
            if n > self.max_frame:
                raise ProtocolError(f"peer announced a {n}-byte frame, over the {self.max_frame}-byte limit")
            if len(self._buf) < LENGTH.size + n:
                return
            with memoryview(self._buf) as view:
                frame = bytes(view[LENGTH.size : LENGTH.size + n])  # one copy, not two
            del self._buf[: LENGTH.size + n]
            yield frame

    @property
    def pending(self) -> int:
        return len(self._buf)


def session_keys(role: str, my_pk: bytes, my_sk: bytes, peer_pk: bytes) -> tuple[bytes, bytes]:
    """(rx, tx) keys from X25519 session keys; ``role`` is 'client' or 'worker'."""
    try:
        if role == "client":
            return sodium.crypto_kx_client_session_keys(my_pk, my_sk, peer_pk)
        return sodium.crypto_kx_server_session_keys(my_pk, my_sk, peer_pk)
    except (CryptoError, ValueError, TypeError) as exc:
        raise ProtocolError(f"key exchange failed: {exc}") from None


RESUME_MAGIC = b"p2pexec-resume/1\n"


def resume_frame(rx_key: bytes, tx_key: bytes, lease: str) -> bytes:
    """The first frame of a stream that takes over lease ``lease`` (the client's, after a hole punch).

    Only the two ends of the lease know its session keys, and ``lease`` (the
    accepted offer's id) makes it differ between leases of the same pair.
    """
    low, high = sorted((rx_key, tx_key))
    token = hashlib.blake2b(lease.encode(), key=low + high, person=b"p2pexec-resume", digest_size=32).digest()
    return RESUME_MAGIC + token


class Sealer:
    """Encrypts one direction of a channel."""

    def __init__(self, key: bytes) -> None:
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
        self.header = sodium.crypto_secretstream_xchacha20poly1305_init_push(self._state, key)
        self.closed = False

    def seal(self, plaintext: bytes, final: bool = False) -> bytes:
        if self.closed:
            raise ProtocolError("channel already closed for sending")
        self.closed = final
        return sodium.crypto_secretstream_xchacha20poly1305_push(
            self._state, plaintext, None, _TAG_FINAL if final else 0
        )


class Opener:
    """Decrypts and authenticates the other direction of a channel."""

    def __init__(self, key: bytes, header: bytes) -> None:
        if len(header) != HEADER_BYTES:
            raise ProtocolError("bad secretstream header")
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
        sodium.crypto_secretstream_xchacha20poly1305_init_pull(self._state, header, key)
        self.finished = False

    def open(self, ciphertext: bytes) -> bytes:
        if self.finished:
            raise ProtocolError("data after the final frame")
        try:
            plaintext, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(self._state, ciphertext)
        except (CryptoError, ValueError, TypeError):
            raise ProtocolError("payload failed authentication (tampered, reordered or wrong key)") from None
        self.finished = tag == _TAG_FINAL
        return plaintext


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


def op_parts(op: Op, arg: int = 0, *data: Buffer) -> list[Buffer]:
    """An operation as buffers to send as they are: big payloads are never copied into one."""
    return [_OP.pack(op, arg, sum(nbytes(d) for d in data)), *data]


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
_SIZE = struct.Struct(">Q")


def pack_parts(parts: Sequence[Buffer]) -> list[Buffer]:
    """Several buffers as one payload: a count, their sizes, then the buffers themselves."""
    sizes = b"".join(_SIZE.pack(nbytes(p)) for p in parts)
    return [_COUNT.pack(len(parts)) + sizes, *parts]


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
        (size,) = _SIZE.unpack_from(view, _COUNT.size + i * _SIZE.size)
        if offset + size > view.nbytes:
            raise ProtocolError("payload part runs past its end")
        out.append(view[offset : offset + size])
        offset += size
    if offset != view.nbytes:
        raise ProtocolError("payload has trailing bytes")
    return out
