"""A lease stream's encryption, without I/O: keys, the channel headers, sealed chunks.

Each side sends a channel header first: whether it does AES in hardware,
and the random prefix of the nonces it will seal under.  Each chunk is
sealed with an AEAD of libsodium's (AEGIS-256 where both ends do AES in
hardware, else XChaCha20-Poly1305) under a nonce that counts the chunks up
from the sender's prefix, its final flag authenticated with it (the STREAM
construction; secretstream, which leases used before, is built alike, with a
32-bit counter and an encrypted tag): altered, reordered, replayed or
dropped frames fail to open, and truncation is detectable, whatever the
stream underneath does on a reset.  An opener that refused a chunk refuses
everything after it.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from typing import NamedTuple

import nacl.bindings as sodium
from nacl._sodium import ffi, lib
from nacl.exceptions import CryptoError
from nacl.utils import random

from ..errors import ProtocolError
from .frames import LENGTH, MAX_FRAME, Buffer, Reassembler, Writable, nbytes

def open_chunk(opener: Opener, reassembler: Reassembler, frame: Buffer) -> memoryview | None:
    """Decrypt a sealed chunk into its message: straight into the message's buffer where it has a place
    there (:meth:`Reassembler.place`: or the reassembler's own buffer, for a message written through its
    file), else through a buffer of its own.  The message, once complete."""
    size = nbytes(frame) - opener.cipher.overhead
    place = reassembler.place(size)
    if place is None:
        return reassembler.feed(opener.open(frame))
    with place:
        try:
            opener.open_into(frame, place)
        except ProtocolError:
            reassembler.unplace()  # (libsodium wiped the place, the last byte of the chunk before included)
            raise
    return reassembler.placed(size)


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


class Cipher(NamedTuple):
    """An AEAD of libsodium's, as a channel seals its chunks with it."""

    name: str
    encrypt: Callable[..., int]
    decrypt: Callable[..., int]
    nonce_bytes: int
    mac_bytes: int

    @property
    def overhead(self) -> int:
        """A sealed chunk's size over its plaintext's: the final flag and the MAC."""
        return 1 + self.mac_bytes


AEGIS256 = Cipher("AEGIS-256", lib.crypto_aead_aegis256_encrypt, lib.crypto_aead_aegis256_decrypt,
                  lib.crypto_aead_aegis256_npubbytes(), lib.crypto_aead_aegis256_abytes())
XCHACHA20 = Cipher("XChaCha20-Poly1305", lib.crypto_aead_xchacha20poly1305_ietf_encrypt,
                   lib.crypto_aead_xchacha20poly1305_ietf_decrypt, lib.crypto_aead_xchacha20poly1305_ietf_npubbytes(),
                   lib.crypto_aead_xchacha20poly1305_ietf_abytes())
KEY_BYTES = 32  # both ciphers', and crypto_kx's session keys'
_HARDWARE_AES = 1  # a header's flag: "AES is in this machine's hardware" (AEGIS is fast here, and constant-time)
_PREFIX_BYTES = 24
HEADER_BYTES = 1 + _PREFIX_BYTES
_NUMBER = struct.Struct(">Q")  # a chunk's, in its nonce


def channel_header(aes: bool) -> bytes:
    """What each side sends first: whether it does AES in hardware (:func:`.portability.hardware_aes`), and
    the random prefix of its nonces."""
    return bytes([_HARDWARE_AES if aes else 0]) + random(_PREFIX_BYTES)


def _cipher(mine: bytes, theirs: bytes) -> Cipher:
    """Both directions' cipher: AEGIS-256 where both ends do AES in hardware (several times XChaCha's speed
    there), else XChaCha20-Poly1305 (fast everywhere, with no table lookups to time)."""
    for header in (mine, theirs):
        if len(header) != HEADER_BYTES or header[0] & ~_HARDWARE_AES:
            raise ProtocolError("bad channel header")
    return AEGIS256 if mine[0] & theirs[0] & _HARDWARE_AES else XCHACHA20


class _Nonces:
    """One direction's nonces: its header's random prefix, then a count of the chunks sealed so far.

    Each chunk has its own nonce, so one altered, replayed, reordered or
    dropped fails to open; its final flag is authenticated with it, so a
    stream cut short is told from one that ended (the STREAM construction).
    """

    def __init__(self, key: bytes, header: bytes, cipher: Cipher) -> None:
        if len(key) != KEY_BYTES:
            raise ProtocolError("bad channel key")
        self.key, self.cipher = key, cipher
        self._nonce = bytearray(header[1 : 1 + cipher.nonce_bytes - _NUMBER.size] + bytes(_NUMBER.size))
        if len(self._nonce) != cipher.nonce_bytes:  # (libsodium reads that many bytes, whatever it is given)
            raise ProtocolError("bad channel header")
        self._count = 0

    def next(self) -> bytes:
        _NUMBER.pack_into(self._nonce, len(self._nonce) - _NUMBER.size, self._count)
        self._count += 1
        return bytes(self._nonce)


class Sealer:
    """Encrypts one direction of a channel: ``header`` is the one this side sent, ``peer`` the other's."""

    def __init__(self, key: bytes, header: bytes, peer: bytes) -> None:
        self._nonces = _Nonces(key, header, _cipher(header, peer))
        self.cipher = self._nonces.cipher
        self.closed = False

    def seal(self, plaintext: Buffer, final: bool = False) -> bytes:
        return bytes(self.seal_frame([plaintext], final)[LENGTH.size :])

    def seal_frame(self, pieces: Sequence[Buffer], final: bool = False) -> memoryview:
        """The frame for ``pieces`` sealed as one chunk: length prefix, final flag, ciphertext and MAC, built in
        one buffer.

        The plaintext is copied once, to where its ciphertext goes, and
        encrypted there (libsodium's AEADs encrypt in place), the MAC
        written just after.  The buffer is not zeroed first: every byte of
        it is written here.
        """
        size, cipher = sum(nbytes(p) for p in pieces), self.cipher
        if size + cipher.overhead > MAX_FRAME:
            raise ProtocolError(f"a {size}-byte chunk does not fit in a {MAX_FRAME}-byte frame")
        if self.closed:
            raise ProtocolError("channel already closed for sending")
        memory = _uncleared("unsigned char[]", LENGTH.size + cipher.overhead + size)
        frame = memoryview(ffi.buffer(memory))
        LENGTH.pack_into(frame, 0, cipher.overhead + size)
        frame[LENGTH.size] = final
        at = LENGTH.size + 1
        for piece in pieces:
            end = at + nbytes(piece)
            frame[at:end] = piece if type(piece) is bytes else memoryview(piece).cast("B")
            at = end
        flag = memory + LENGTH.size
        cipher.encrypt(flag + 1, ffi.NULL, flag + 1, size, flag, 1, ffi.NULL, self._nonces.next(), self._nonces.key)
        self.closed = final
        return frame


_uncleared = ffi.new_allocator(should_clear_after_alloc=False)


class Opener:
    """Decrypts and authenticates the other direction of a channel: ``header`` is the one the peer sent,
    ``mine`` this side's."""

    def __init__(self, key: bytes, header: bytes, mine: bytes) -> None:
        self._nonces = _Nonces(key, header, _cipher(mine, header))
        self.cipher = self._nonces.cipher
        self.finished = False
        self._failed = False

    def open(self, ciphertext: Buffer) -> bytearray:
        """The plaintext of ``ciphertext``, in a buffer of its own (not copied again into ``bytes``)."""
        out = bytearray(max(0, nbytes(ciphertext) - self.cipher.overhead))
        self.open_into(ciphertext, out)
        return out

    def open_into(self, ciphertext: Buffer, out: Writable) -> None:
        """Decrypt ``ciphertext`` into ``out``, which is exactly its plaintext's size.

        A chunk that fails may leave zeros in ``out`` (libsodium wipes the
        output of a failed decryption), and the opener refuses every chunk
        after it: a tampered chunk must never pass for a dropped one.
        """
        if self._failed:
            raise ProtocolError("payload after one that failed authentication")
        if self.finished:
            raise ProtocolError("data after the final frame")
        cipher = self.cipher
        size = nbytes(ciphertext) - cipher.overhead
        if size < 0:
            raise ProtocolError("payload failed authentication (shorter than a sealed chunk)")
        if memoryview(out).nbytes != size:
            raise ValueError(f"a {size}-byte plaintext does not fill a {memoryview(out).nbytes}-byte buffer")
        with ffi.from_buffer("unsigned char[]", ciphertext) as sealed, \
                ffi.from_buffer(out, require_writable=True) as plain:
            final = sealed[0]
            failed = final > 1 or cipher.decrypt(plain, ffi.NULL, ffi.NULL, sealed + 1, size + cipher.mac_bytes,
                                                 sealed, 1, self._nonces.next(), self._nonces.key)
        if failed:
            self._failed = True
            raise ProtocolError("payload failed authentication (tampered, reordered or wrong key)")
        self.finished = final == 1
