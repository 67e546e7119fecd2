"""An end-to-end encrypted, framed message channel over one libp2p stream."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import trio

from .. import portability
from ..errors import ProtocolError
from ..protocol.frames import (
    MAX_FRAME, MAX_MESSAGE, Buffer, FrameDecoder, Op, Reassembler, chunk_pieces, encode_frame, encode_op, Writable,
)
from ..protocol.sealing import Opener, Sealer, channel_header, open_chunk
from .eager_locks import EagerLock
from .tcp_stream import AT_ONCE_WRITER

READ_SIZE = 1 << 20


class PeerLost(ProtocolError):
    """The stream underneath broke: the peer went away or reset it."""


class FramedStream:
    """Length-prefixed frames over a libp2p stream; EOF mid-frame is an error.

    Sending and receiving may move to another stream at a frame boundary
    (:meth:`move_tx`, :meth:`move_rx`): a lease moves from a relayed
    connection to a direct one without its encryption noticing.
    """

    def __init__(self, stream: Any, max_frame: int = MAX_FRAME) -> None:
        self.stream = stream  # where frames are read from
        self.tx_stream = stream  # where frames are written to
        self.decoder = FrameDecoder(max_frame)
        self._frames: deque[bytes] = deque()
        self._old: list[Any] = []  # streams moved away from, closed with this one
        self.silence_limit = math.inf  # a peer that sends nothing for this long is lost (:meth:`check_silence`)
        self._reading_since: float | None = None  # trio.current_time() when the read waiting now began

    def move_tx(self, stream: Any) -> None:
        """Write further frames to ``stream``."""
        if self.tx_stream is not self.stream:
            self._old.append(self.tx_stream)
        self.tx_stream = stream

    def move_rx(self, stream: Any) -> None:
        """Read further frames from ``stream``; the old one must have ended at a frame boundary."""
        if self._frames or self.decoder.pending:
            raise ProtocolError("the peer sent data after moving the lease to another connection")
        if self.stream is not self.tx_stream:
            self._old.append(self.stream)
        self.stream = stream

    async def send(self, data: bytes) -> None:
        await self.send_frame(encode_frame(data))

    async def send_frame(self, frame: Buffer) -> None:
        """Write ``frame``, length prefix included (:meth:`Sealer.seal_frame`), as it is; a small one without
        a turn of the loop after it (every writer of frames waits for something else next)."""
        at_once = AT_ONCE_WRITER.set(True)
        try:
            await self.tx_stream.write(memoryview(frame))  # slices of a view cost no copy in the muxer
        except trio.Cancelled:
            raise
        except Exception as exc:
            raise PeerLost(f"sending failed: {exc!r}") from None
        finally:
            AT_ONCE_WRITER.reset(at_once)

    async def recv(self) -> bytes | None:
        """Next frame, or None on a clean end of stream."""
        while not self._frames:
            self._reading_since = trio.current_time()
            try:
                chunk = await self._read()
            finally:
                self._reading_since = None
            if not chunk:
                if self.decoder.pending:
                    raise PeerLost("stream ended in the middle of a frame")
                return None
            self._frames.extend(self.decoder.feed(chunk))
        return self._frames.popleft()

    def check_silence(self) -> None:
        """PeerLost if a read has waited longer than :attr:`silence_limit` for the peer to send anything
        (time spent on what was read does not count).  A lease's heartbeat calls it every few seconds: a
        deadline around each read was a cancel scope per message on both ends."""
        since = self._reading_since
        if since is not None and trio.current_time() - since > self.silence_limit:
            raise PeerLost(f"the peer sent nothing for {self.silence_limit:g} s (frozen, or its network is gone)")

    async def _read(self) -> bytes:
        """Some bytes, b"" at the end of the stream."""
        try:
            return await self.stream.read(READ_SIZE)
        except trio.Cancelled:
            raise
        except Exception as exc:
            if type(exc).__name__ != "StreamEOF":
                raise PeerLost(f"receiving failed: {exc!r}") from None
            return b""

    def _streams(self) -> list[Any]:
        return list(dict.fromkeys([self.stream, self.tx_stream, *self._old]))

    async def close(self) -> None:
        await _close(self._streams())

    async def reset(self) -> None:
        for stream in self._streams():
            try:
                await stream.reset()
            except Exception:
                pass

    async def close_old(self) -> None:
        """Close the streams a move left behind (the new one carries on)."""
        old, self._old = self._old, []
        await _close(old)


async def _close(streams: list[Any]) -> None:
    with trio.move_on_after(2):
        for stream in streams:
            try:
                await stream.close()
            except Exception:
                pass


class SecureChannel:
    """Sealed chunks (:mod:`..protocol.sealing`) in both directions over a :class:`FramedStream`.

    A message is a sequence of buffers, sent in chunks of bounded size
    without first being joined; one message's chunks never interleave with
    another's.
    """

    def __init__(self, framed: FramedStream, sealer: Sealer, opener: Opener,
                 allocate: Callable[[int], Writable] | None = bytearray, max_message: int = MAX_MESSAGE) -> None:
        self.framed = framed
        self._sealer = sealer
        self._opener = opener
        self._reassembler = Reassembler(max_message, allocate)
        self._send_lock = EagerLock()

    @classmethod
    async def establish(cls, framed: FramedStream, rx_key: bytes, tx_key: bytes,
                        allocate: Callable[[int], Writable] | None = bytearray,
                        max_message: int = MAX_MESSAGE) -> "SecureChannel":
        mine = channel_header(portability.hardware_aes())
        await framed.send(mine)
        theirs = await framed.recv()
        if theirs is None:
            raise PeerLost("peer closed the stream during the key exchange")
        return cls(framed, Sealer(tx_key, mine, theirs), Opener(rx_key, theirs, mine), allocate, max_message)

    @property
    def cipher(self) -> str:
        """The AEAD both directions seal with (AEGIS-256 where both ends do AES in hardware)."""
        return self._sealer.cipher.name

    @property
    def sending(self) -> bool:
        """Is a message being written (or waiting to be)?"""
        return self._send_lock.locked()

    async def send(self, message: Buffer | Sequence[Buffer], final: bool = False) -> None:
        parts = [message] if isinstance(message, (bytes, bytearray, memoryview)) else message
        async with self._send_lock:
            chunks = chunk_pieces(parts)
            chunk = next(chunks)
            for following in chunks:
                await self.framed.send_frame(self._sealer.seal_frame(chunk))
                chunk = following
            await self.framed.send_frame(self._sealer.seal_frame(chunk, final))

    async def recv(self) -> memoryview | None:
        """Next message, or None once the peer sent its final frame."""
        self._reassembler.rest()  # (the last message is done with, if its reader kept nothing of it)
        while not self._opener.finished:
            frame = await self.framed.recv()
            if frame is None:
                raise PeerLost("stream ended without its final frame (truncated)")
            message = open_chunk(self._opener, self._reassembler, frame)
            if self._opener.finished:
                break
            if message is not None:
                return message
        return None

    async def move_tx(self, stream: Any) -> None:
        """Send MOVE as the last message on the current stream, then send on ``stream``.

        The peer answers with its own MOVE; whoever receives a MOVE reads
        from the new stream after it (:meth:`FramedStream.move_rx`).
        """
        async with self._send_lock:
            for chunk in chunk_pieces([encode_op(Op.MOVE)]):
                await self.framed.send_frame(self._sealer.seal_frame(chunk))
            self.framed.move_tx(stream)

    async def close(self) -> None:
        """Send the final frame (if not yet sent) and half-close."""
        if not self._sealer.closed:
            try:
                await self.send(encode_op(Op.BYE), final=True)
            except ProtocolError:
                pass
        await self.framed.close()
