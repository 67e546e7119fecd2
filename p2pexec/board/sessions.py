"""One pub, sub or pipe on the board's SSH side: its channel, its threads and its outbox.

What a session may do and where its lines go, the hub (:mod:`.hub`) decides;
this module only moves bytes.  Relaying never waits on a receiver: every sub
and pipe has a bounded :class:`Outbox` drained by its own thread
(:meth:`StreamSession.write_loop`), and one whose outbox overflows is
disconnected, so a stalled reader cannot stall its topic (as it can on pico.sh).
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import TYPE_CHECKING, Any, Protocol

import paramiko

if TYPE_CHECKING:
    from .hub import Session

log = logging.getLogger("p2pexec.board")

MESSAGE_TIMEOUT = 1.0    # to send a last message to a client that does not read
CHUNK = 32768            # bytes read from a channel at once
BATCH = 65536            # bytes written to a receiver at once

ClientGone = (OSError, EOFError, paramiko.SSHException)


class Board(Protocol):
    """What a session asks of its board (:class:`.dispatch.Dispatcher`)."""

    max_line: int
    subscriber_queue: int

    def _relay(self, session: "StreamSession", line: bytes) -> bool: ...
    def _drop(self, reason: str) -> None: ...
    def _release_slot(self, channel: paramiko.Channel) -> None: ...
    def _leave(self, session: "StreamSession") -> None: ...
    def _forget(self, session: "StreamSession") -> None: ...
    def _wake(self) -> None: ...
    def _spawn(self, target: Any, name: str, *args: object) -> None: ...


class Outbox:
    """A receiver's bounded line queue: offering never blocks, taking does."""

    def __init__(self, limit: int) -> None:
        self._items: collections.deque[bytes] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._limit = limit
        self._closed = False
        self._aborted = False

    def offer(self, line: bytes) -> bool:
        """Queue ``line``; False if the outbox is full (its reader is too slow)."""
        with self._cond:
            if self._closed:
                return True
            if len(self._items) >= self._limit:
                return False
            self._items.append(line)
            self._cond.notify()
            return True

    def close(self, abort: bool = False) -> None:
        """No more lines; with ``abort`` drop the queued ones too."""
        with self._cond:
            self._closed = True
            if abort:
                self._aborted = True
                self._items.clear()
            self._cond.notify()

    def take(self) -> bytes | None:
        """The next lines (up to BATCH bytes) joined, or None once closed and drained."""
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            if self._aborted or not self._items:
                return None
            out, size = [], 0
            while self._items and size < BATCH:
                line = self._items.popleft()
                out.append(line)
                size += len(line)
            return b"".join(out)


class StreamSession:
    """One pipe, sub or pub: a channel joined to a topic (the hub's :class:`.hub.Session` ``state``)."""

    def __init__(self, board: Board, conn: object, channel: paramiko.Channel, state: "Session[Any]") -> None:
        self.board, self.conn, self.channel = board, conn, channel
        self.id, self.cmd, self.user, self.topic = state.id, state.cmd, state.user, state.topic
        self.client_id = state.client_id
        self.outbox = Outbox(board.subscriber_queue) if state.cmd.name != "pub" else None
        self._lock = threading.Lock()
        self._outcome: tuple[int, str | None] | None = None
        self._finished = False

    @property
    def ending(self) -> bool:
        return self._outcome is not None

    def end(self, status: int, message: str | None) -> bool:
        """Decide how the session ends (first decision wins) and wake its threads."""
        with self._lock:
            if self._outcome is not None:
                return False
            self._outcome = (status, message)
        if self.outbox is not None:
            self.outbox.close(abort=True)
        self.board._wake()
        return True

    def stop(self, status: int, message: str | None) -> None:
        """End the session from another thread, without waiting on its client."""
        if self.end(status, message):
            self.board._spawn(self.finish, f"board-stop-{self.client_id}")

    def finish(self) -> None:
        """Leave the topic, then send the message and exit status and close (once)."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
            status, message = self._outcome or (0, None)
        # First, so that whoever sees the session gone from its topic may start another.
        self.board._release_slot(self.channel)
        self.board._leave(self)
        close_channel(self.channel, status, err=message)
        self.board._forget(self)

    def write_loop(self) -> None:
        assert self.outbox is not None
        while (data := self.outbox.take()) is not None:
            try:
                self.channel.sendall(data)
            except ClientGone:
                self.end(1, None)
                return

    def read_loop(self, relay: bool) -> None:
        """Relay whole lines from the client (or, for sub, discard them) until EOF."""
        buf = bytearray()
        limit = self.board.max_line
        while not self.ending:
            try:
                chunk = self.channel.recv(CHUNK)
            except ClientGone:
                chunk = b""
            if not chunk:
                break
            if not relay:
                continue
            buf += chunk
            if b"\n" in chunk:
                *lines, rest = buf.split(b"\n")
                buf = bytearray(rest)
                for line in lines:
                    if len(line) > limit:
                        return self.drop("too-long", "line too long")
                    if not self.board._relay(self, bytes(line) + b"\n"):
                        return
            if len(buf) > limit:
                return self.drop("too-long", "line too long")
        if buf and self.channel.eof_received and not self.ending:  # a clean EOF, not a crash
            self.board._relay(self, bytes(buf) + b"\n")

    def drop(self, reason: str, message: str) -> None:
        """End this session for breaking a limit, counted in ``dropped`` by reason."""
        self.board._drop(reason)
        self.end(1, message)
        self.finish()

    def watch(self) -> None:
        """sub: ignore stdin (EOF included) and end the session when the channel closes."""
        self.read_loop(relay=False)
        self.channel.recv_exit_status()  # server side: returns once the channel is closed
        self.end(0, None)

    def pipe_input(self) -> None:
        """pipe: relay stdin; EOF ends the session once the outbox is flushed."""
        self.read_loop(relay=True)
        if self.outbox is not None:
            self.outbox.close()


def close_channel(channel: paramiko.Channel, status: int, out: str = "", err: str | None = None) -> None:
    """Send the last output, the exit status, and close; never raise if the client is gone."""
    try:
        channel.settimeout(MESSAGE_TIMEOUT)
        if out:
            channel.sendall(out.encode())
        if err:
            channel.sendall_stderr(err.encode() + b"\n")
    except ClientGone:
        pass
    try:
        if not channel.closed:
            channel.send_exit_status(status)
        channel.close()
    except ClientGone:
        pass

