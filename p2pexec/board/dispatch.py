"""What runs on each exec channel of the board, and the stream sessions that lines are relayed between.

    exec request ──► queue (after paramiko's reply) ──► session thread: parse (.commands), count
                     against sessions_per_user, then one of
                       help, user, ls, invite, join, members ──► hub.command ──► output, actions
                       relay ──────────────────────────────────► where the board's relay is
                       pub, sub, pipe ─────────────────────────► hub.join ──► StreamSession (.sessions)

A stream session's lines come back here (:meth:`Dispatcher._relay`): their
signature is checked outside the lock, the hub names the receivers under it,
and the line is offered to their outboxes under it too, so every receiver of a
topic gets its lines in one order.  What the hub decides beyond that (ending
sessions, hanging up, saving) goes to the server's ``apply``, outside the lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import paramiko

from .commands import Command, CommandError, parse
from .hub import STREAMS, Action, Hub, Refused
from .listener import Connection
from .sessions import StreamSession, close_channel
from .threads import Threads

log = logging.getLogger("p2pexec.board")

SHELL_USAGE = "this board runs commands, not a shell: ssh -T HOST help"


class Dispatcher:
    """Runs each exec channel's command, and keeps the stream sessions until they have sent their exit status.

    It is the ``board`` of its :class:`.StreamSession` s (:class:`.sessions.Board`).  ``apply(actions, cluster)``
    does what the hub decided; ``relay_info(conn)`` answers the ``relay`` command.
    """

    def __init__(self, cond: threading.Condition, hub: Hub[Connection, paramiko.Channel], threads: Threads, *,
                 apply: Callable[[Iterable[Action], str | None], None], relay_info: Callable[[Connection], str],
                 max_line: int, subscriber_queue: int) -> None:
        self._cond = cond  # the board's one lock: guards the hub and the sessions below
        self._hub = hub
        self._threads = threads
        self._apply = apply
        self._relay_info = relay_info
        self.max_line, self.subscriber_queue = max_line, subscriber_queue
        self.sessions: set[StreamSession] = set()  # until they have sent their exit status
        self._by_id: dict[int, StreamSession] = {}  # the same, by the hub's session id

    def session(self, session_id: int) -> StreamSession | None:
        """The stream session with the hub's id ``session_id``, if it has not sent its exit status yet."""
        with self._cond:
            return self._by_id.get(session_id)

    def queue(self, conn: Connection, channel: paramiko.Channel, command: bytes | None) -> bool:
        """Start ``command`` (None: a shell) on ``channel`` once paramiko has answered its request;
        False if the channel has a command already."""
        transport, chanid = conn.transport, channel.get_id()
        if chanid in transport.started:
            return False  # one command per channel
        transport.started.add(chanid)
        transport.pending_starts[chanid] = lambda: self._threads.spawn(
            self._run, f"board-session-{conn.address}", conn, channel, command)
        return True

    def _run(self, conn: Connection, channel: paramiko.Channel, command: bytes | None) -> None:
        def done(status: int, out: str = "", err: str | None = None) -> None:
            self._release_slot(channel)  # first: a client told we are done may start another
            close_channel(channel, status, out, err)

        user = None
        try:
            with self._cond:
                login = self._hub.login(conn)
                allowed = self._hub.still_allowed(conn, time.time())
            if login is None or conn.transport.get_username() != login.user:
                return close_channel(channel, 1, err="not authenticated")
            user = login.user
            if not allowed:
                return close_channel(channel, 1, err="access revoked")
            if not self._take_slot(user, channel):
                return close_channel(channel, 1, err=f"too many sessions for {user} "
                                                     f"(limit {self._hub.sessions_per_user})")
            if command is None:
                return done(1, err=SHELL_USAGE)
            try:
                cmd = parse(command.decode("utf-8"), user)
            except UnicodeDecodeError:
                raise CommandError("command is not valid UTF-8") from None
            log.debug("%s@%s: %s", user, conn.address, cmd.to_line())
            with self._cond:
                self._hub.check_command(conn, cmd)
            if cmd.name == "relay":
                done(0, out=self._relay_info(conn))
            elif cmd.name in STREAMS:
                self._stream(conn, channel, cmd)
            else:
                with self._cond:
                    out, actions = self._hub.command(conn, cmd, time.time())
                self._apply(actions, cmd.topic)
                done(0, out=out)
        except CommandError as exc:
            done(1, err=str(exc))
        except Exception:
            log.exception("board session of %s failed", user)
            done(1, err="internal error")
        finally:
            self._release_slot(channel)

    def _take_slot(self, user: str, channel: paramiko.Channel) -> bool:
        """Count a running command against ``user``'s sessions_per_user; False if over."""
        with self._cond:
            taken = self._hub.open(channel, user)
        if not taken:
            log.info("refused a session of %s: %d sessions running", user, self._hub.sessions_per_user)
        return taken

    def _release_slot(self, channel: paramiko.Channel) -> None:
        """Undo :meth:`_take_slot` (idempotent)."""
        with self._cond:
            self._hub.close(channel)

    def _stream(self, conn: Connection, channel: paramiko.Channel, cmd: Command) -> None:
        session, refusal = None, "refused"
        with self._cond:
            try:
                state, actions = self._hub.join(conn, cmd, time.time(), time.monotonic())
            except Refused as exc:
                refusal, actions = str(exc), exc.actions
            else:
                session = StreamSession(self, conn, channel, state)
                self._by_id[session.id] = session
                self.sessions.add(session)
                conn.sessions.add(session)
            self._cond.notify_all()
        self._apply(actions, cmd.topic)
        if session is None:
            if refusal == "access denied":
                log.info("access denied: %s to %s", conn.transport.get_username(), cmd.topic)
            self._release_slot(channel)
            return close_channel(channel, 1, err=refusal)
        try:
            if cmd.name == "sub":
                self._threads.spawn(session.watch, f"board-watch-{session.client_id}")
                session.write_loop()
            elif cmd.name == "pipe":
                self._threads.spawn(session.pipe_input, f"board-read-{session.client_id}")
                session.write_loop()
            else:
                if cmd.block and not self._wait_receivers(session, cmd.timeout):
                    session.end(1, "timeout reached, exiting")
                else:
                    session.read_loop(relay=True)
        finally:
            session.finish()

    # -- what a StreamSession asks of its board (.sessions.Board)

    def _spawn(self, target: Any, name: str, *args: object) -> None:
        self._threads.spawn(target, name, *args)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _leave(self, session: StreamSession) -> None:
        """Take ``session`` off its topic: it gets no more lines, and may end plain subs."""
        with self._cond:
            actions = self._hub.leave(session.id)
            self._cond.notify_all()
        self._apply(actions, None)

    def _forget(self, session: StreamSession) -> None:
        """``session`` has sent its exit status: stop() need not wait for it."""
        with self._cond:
            self.sessions.discard(session)
            self._by_id.pop(session.id, None)
            session.conn.sessions.discard(session)  # type: ignore[attr-defined]
            self._cond.notify_all()

    def _wait_receivers(self, session: StreamSession, timeout: float | None) -> bool:
        """pub -b: wait for a sub or pipe on the topic; False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(
                lambda: session.ending or self._hub.has_receivers(session.topic), timeout)

    def _relay(self, session: StreamSession, line: bytes) -> bool:
        """Queue ``line`` for the receivers the hub names, in one order for all; False if that ended
        ``session``.  The line's signature is checked before, outside the lock."""
        with self._cond:
            sender = self._hub.sender(session.id)
        if sender is None:
            return False
        checked = sender.check(line)
        slow: list[StreamSession] = []
        with self._cond:
            result = self._hub.relay(session.id, checked, time.monotonic())
            for sid in result.to:
                r = self._by_id.get(sid)
                if r is not None and r.outbox is not None and not r.outbox.offer(line):
                    slow.append(r)
            if slow:
                self._hub.dropped["too-slow"] += len(slow)
        if result.refusal is not None:
            log.debug("dropped a line from %s on %s: %s", session.client_id, session.topic, result.refusal)
        for r in slow:
            log.info("%s on %s is too slow, disconnecting", r.client_id, r.topic)
            r.stop(1, "too slow, disconnecting")
        if result.end is not None:
            log.info("%s on %s exceeds %g lines/s, disconnecting",
                     session.client_id, session.topic, self._hub.lines_per_second)
            session.end(result.end.status, result.end.message)
            session.finish()
            return False
        return True

    def _drop(self, reason: str) -> None:
        """A session broke a limit and is being ended: count it."""
        with self._cond:
            self._hub.dropped[reason] += 1
