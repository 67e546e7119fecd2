"""Data-plane framing, encryption and lease operations, without I/O.

Wire layout of a lease stream (client dials the worker it accepted)::

    client -> worker   frame: the signed ``accept`` board line (plaintext inside Noise)
    both directions    frame: 24-byte secretstream header
    both directions    frames: secretstream ciphertexts of lease operations
    each direction     last frame carries TAG_FINAL; EOF before it is truncation

A frame is a 4-byte big-endian length and that many bytes.  Secretstream
(XChaCha20-Poly1305) makes altered, reordered, replayed or dropped frames
fail to decrypt, and the final tag makes truncation detectable, whatever
the stream underneath does on a reset.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator

import nacl.bindings as sodium
from nacl.exceptions import CryptoError

from ..errors import ProtocolError

LENGTH = struct.Struct(">I")
MAX_FRAME = 1 << 30
HEADER_BYTES = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES
_TAG_FINAL = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL
_OP = struct.Struct(">BQI")  # op, arg, data length: ops are self-delimiting, several fit in one message


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
            frame = bytes(self._buf[LENGTH.size : LENGTH.size + n])
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


def encode_op(op: Op, arg: int = 0, data: bytes = b"") -> bytes:
    return _OP.pack(op, arg, len(data)) + data


def decode_ops(plaintext: bytes) -> Iterator[tuple[Op, int, bytes]]:
    """The operations of one channel message, in order."""
    view, offset = memoryview(plaintext), 0
    while offset < len(plaintext):
        if len(plaintext) - offset < _OP.size:
            raise ProtocolError("short lease operation")
        code, arg, n = _OP.unpack_from(plaintext, offset)
        offset += _OP.size
        if n > len(plaintext) - offset:
            raise ProtocolError("lease operation longer than its message")
        try:
            op = Op(code)
        except ValueError:
            raise ProtocolError(f"unknown lease operation {code}") from None
        yield op, arg, bytes(view[offset : offset + n])
        offset += n
