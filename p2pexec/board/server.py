"""The p2pexec board: a pico.sh-compatible pubsub SSH server (paramiko server mode).

Threads: one accepts; one per connection runs the SSH handshake and waits
for the connection to end; one per session (exec channel) runs it, and pipe
and sub sessions have a second one reading their channel.  Relaying never
waits on a receiver: every sub and pipe has a bounded outbox drained by its
own thread, and one whose outbox overflows is disconnected, so a stalled
reader cannot stall its topic (as it can on pico.sh).

Unlike pico.sh the board knows who sends each line, so it refuses p2pexec
messages signed by anyone but the session's own user and key, and it
enforces access lists, which survive restarts in ``state_dir/clusters.json``.
"""

from __future__ import annotations

import base64
import collections
import json
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
from paramiko.common import MSG_CHANNEL_REQUEST

from ..errors import ConfigurationError
from ..keys import ED25519, Keyring, generate_identity_file, parse_openssh_public, valid_username
from ..protocol.messages import check_sender
from .commands import HELP, PUBLIC, Command, CommandError, parse, valid_topic

log = logging.getLogger("p2pexec.board")

KEEPALIVE = 15           # seconds between SSH keepalives on every connection
AUTH_TIMEOUT = 30.0      # a connection must authenticate within this
MESSAGE_TIMEOUT = 1.0    # to send a last message to a client that does not read
STOP_GRACE = 2.0         # stop(): time for sessions to send their exit status
LINGER = 1.0             # stop(): time for clients to hang up after that
JOIN_TIMEOUT = 5.0       # stop(): time for every thread to end
CHUNK = 32768            # bytes read from a channel at once
BATCH = 65536            # bytes written to a receiver at once
SHELL_USAGE = "this board runs commands, not a shell: ssh -T HOST help"

_ClientGone = (OSError, EOFError, paramiko.SSHException)


def load_or_create_host_key(path: str | os.PathLike[str]) -> paramiko.Ed25519Key:
    """The board's host key, created (OpenSSH Ed25519, mode 0600) on first use."""
    path = Path(path).expanduser()
    if not path.exists():
        generate_identity_file(path, comment="p2pexec board host key")
        log.info("created board host key %s", path)
    return paramiko.Ed25519Key.from_private_key_file(str(path))


def raw_ed25519(key: paramiko.PKey) -> bytes | None:
    """The raw 32-byte public key of a paramiko Ed25519 key, else None."""
    if key.get_name() != ED25519:
        return None
    try:
        return parse_openssh_public(ED25519, base64.b64encode(key.asbytes()).decode())
    except ValueError:
        return None


class _Refused(Exception):
    """A session may not start; the message goes to the client's stderr."""


class _Outbox:
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


@dataclass(eq=False)
class _Connection:
    transport: "_Transport"
    sock: socket.socket
    address: str
    user: str | None = None
    key: bytes | None = None
    sessions: set["_Session"] = field(default_factory=set)


@dataclass(eq=False)
class _Topic:
    receivers: list["_Session"] = field(default_factory=list)  # subs and pipes
    pubs: list["_Session"] = field(default_factory=list)


def _start_after_reply(chan: paramiko.Channel, m: paramiko.Message) -> None:
    paramiko.Channel._handle_request(chan, m)
    start = chan.transport.pending_starts.pop(chan.get_id(), None)
    if start is not None:
        start()


class _Transport(paramiko.Transport):
    """A Transport that starts a session only once its exec request is answered.

    paramiko replies to an exec request after ``check_channel_exec_request``
    returns; a session started from there could send its output, exit status
    and close first, and a paramiko client's ``exec_command`` then fails with
    "Channel closed".  So the start is queued and run after the reply.
    """

    _channel_handler_table = {
        **paramiko.Transport._channel_handler_table,
        MSG_CHANNEL_REQUEST: _start_after_reply,
    }

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.pending_starts: dict[int, Callable[[], None]] = {}
        self.started: set[int] = set()  # channel ids that already have a command


class _Interface(paramiko.ServerInterface):
    """Public-key authentication against the keyring; session channels only."""

    def __init__(self, board: "BoardServer", conn: _Connection) -> None:
        self._board = board
        self._conn = conn

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        raw = raw_ed25519(key)
        if raw is None or not self._board.users.allows(username, raw):
            log.debug("refused key for %r from %s", username, self._conn.address)
            return paramiko.AUTH_FAILED
        # paramiko asks before it checks the signature, but authentication can
        # only succeed right after this call and nothing is asked after it, so
        # the last user and key recorded here are the authenticated ones.
        self._conn.user, self._conn.key = username, raw
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session" and self._conn.user is not None:
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        return self._board._queue_session(self._conn, channel, command)

    def check_channel_shell_request(self, channel: paramiko.Channel) -> bool:
        return self._board._queue_session(self._conn, channel, None)

    def check_channel_pty_request(self, *args: object) -> bool:
        return False


class _Session:
    """One pipe, sub or pub: a channel joined to a topic."""

    def __init__(self, board: "BoardServer", conn: _Connection, channel: paramiko.Channel,
                 cmd: Command, serial: int) -> None:
        assert conn.user is not None and conn.key is not None and cmd.topic is not None
        self.board, self.conn, self.channel, self.cmd = board, conn, channel, cmd
        self.user, self.key, self.topic = conn.user, conn.key, cmd.topic
        self.client_id = f"{self.user}#{serial}"
        self.outbox = _Outbox(board.subscriber_queue) if cmd.name != "pub" else None
        self.saw_publisher = False  # sub: a pub has been here since it joined
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
        self.board._leave(self)
        _close(self.channel, status, err=message)
        self.board._forget(self)

    def write_loop(self) -> None:
        assert self.outbox is not None
        while (data := self.outbox.take()) is not None:
            try:
                self.channel.sendall(data)
            except _ClientGone:
                self.end(1, None)
                return

    def read_loop(self, relay: bool) -> None:
        """Relay whole lines from the client (or, for sub, discard them) until EOF."""
        buf = bytearray()
        limit = self.board.max_line
        while not self.ending:
            try:
                chunk = self.channel.recv(CHUNK)
            except _ClientGone:
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
                        return self._too_long()
                    self.board._relay(self, bytes(line) + b"\n")
            if len(buf) > limit:
                return self._too_long()
        if buf and self.channel.eof_received and not self.ending:  # a clean EOF, not a crash
            self.board._relay(self, bytes(buf) + b"\n")

    def _too_long(self) -> None:
        with self.board._cond:
            self.board.dropped["too-long"] += 1
        self.end(1, "line too long")
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


def _close(channel: paramiko.Channel, status: int, out: str = "", err: str | None = None) -> None:
    """Send the last output, the exit status, and close; never raise if the client is gone."""
    try:
        channel.settimeout(MESSAGE_TIMEOUT)
        if out:
            channel.sendall(out.encode())
        if err:
            channel.sendall_stderr(err.encode() + b"\n")
    except _ClientGone:
        pass
    try:
        if not channel.closed:
            channel.send_exit_status(status)
        channel.close()
    except _ClientGone:
        pass


class BoardServer:
    """A pico.sh-pipe-compatible board over SSH, with real access control."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0,
                 host_key: paramiko.PKey, users: Keyring,
                 state_dir: Path,
                 verify_sender: bool = True,
                 max_line: int = 65536, subscriber_queue: int = 1000) -> None:
        self.host, self.port = host, port
        self.host_key, self.users = host_key, users
        self.state_dir = Path(state_dir)
        self.verify_sender = verify_sender
        self.max_line, self.subscriber_queue = max_line, subscriber_queue
        self.dropped: collections.Counter[str] = collections.Counter()
        self._cond = threading.Condition()  # guards all the state below
        self._topics: dict[str, _Topic] = {}
        self._members: dict[str, tuple[str, ...]] = self._load_members()
        self._sessions: set[_Session] = set()
        self._connections: set[_Connection] = set()
        self._threads: set[threading.Thread] = set()
        self._serial = 0
        self._started = self._stopping = False
        self._state_lock = threading.Lock()  # serialises clusters.json writes
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None  # stop() wakes the accept loop through it
        self._wake_w: socket.socket | None = None

    # -- lifecycle

    def start(self) -> None:
        """Bind and listen (``port=0`` picks a free port, stored in ``self.port``)."""
        with self._cond:
            if self._started:
                raise RuntimeError("BoardServer.start() may be called once")
            self._started = True
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._listener = socket.create_server((self.host, self.port), family=family, backlog=128)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._spawn(self._accept_loop, "board-accept")
        log.info("board listening on %s port %d", self.host, self.port)

    def stop(self) -> None:
        """Close the listener and every session, and join the threads, in bounded time."""
        with self._cond:
            if self._stopping or self._wake_w is None:
                return
            self._stopping = True
            sessions = list(self._sessions)
            self._cond.notify_all()
        self._wake_w.send(b"x")
        started = time.monotonic()
        for session in sessions:
            session.stop(1, "board is shutting down")
        with self._cond:
            self._cond.wait_for(lambda: not self._sessions, STOP_GRACE)
            connections = list(self._connections)
        # Half-close first: clients read their exit status, then hang up.  Closing
        # outright would reset connections that OpenSSH is still writing to.
        for conn in connections:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        with self._cond:
            self._cond.wait_for(lambda: not self._connections, LINGER)
            connections = list(self._connections)
        for conn in connections:
            conn.transport.close()
        self._join_threads(started + JOIN_TIMEOUT)
        self._wake_w.close()
        assert self._wake_r is not None
        self._wake_r.close()
        log.info("board on port %d stopped", self.port)

    def __enter__(self) -> "BoardServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- membership

    def set_members(self, cluster: str, members: list[str]) -> None:
        """Set who besides its owner may join ``cluster`` (``owner/name``); persisted.

        Sessions of users no longer listed are disconnected with ``access denied``.
        """
        if not valid_topic(cluster) or cluster.startswith(PUBLIC + "/"):
            raise ValueError(f"invalid cluster {cluster!r}: expected OWNER/NAME, not public")
        bad = [m for m in members if not valid_username(m)]
        if bad:
            raise ValueError(f"invalid user names {bad}")
        new = tuple(dict.fromkeys(members))
        with self._state_lock:
            with self._cond:
                if self._members.get(cluster) == new:
                    return
                state = {**self._members, cluster: new}
            self._save_members(state)
            with self._cond:
                self._members[cluster] = new
                topic = self._topics.get(cluster)
                sessions = (topic.receivers + topic.pubs) if topic else []
                revoked = [s for s in sessions if not self._allowed(s.user, cluster)]
        log.info("members of %s: %s", cluster, ", ".join(new) or "(owner only)")
        for session in revoked:
            session.stop(1, "access denied")

    def members(self, cluster: str) -> tuple[str, ...] | None:
        """The access list of ``cluster``, or None if its owner never set one."""
        with self._cond:
            return self._members.get(cluster)

    def clients(self, topic: str) -> dict[str, int]:
        """How many pub, sub and pipe sessions ``topic`` has."""
        with self._cond:
            return self._counts(topic)

    def wait_clients(self, topic: str, predicate: Callable[[dict[str, int]], bool],
                     timeout: float | None = None) -> bool:
        """Block until ``predicate(clients(topic))`` holds; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self._counts(topic)), timeout)

    def _counts(self, topic: str) -> dict[str, int]:
        t = self._topics.get(topic)
        if t is None:
            return {"pub": 0, "sub": 0, "pipe": 0}
        subs = sum(1 for s in t.receivers if s.cmd.name == "sub")
        return {"pub": len(t.pubs), "sub": subs, "pipe": len(t.receivers) - subs}

    def _allowed(self, user: str, topic: str) -> bool:
        owner = topic.split("/", 1)[0]
        return owner == PUBLIC or user == owner or user in self._members.get(topic, ())

    @property
    def _state_file(self) -> Path:
        return self.state_dir / "clusters.json"

    def _load_members(self) -> dict[str, tuple[str, ...]]:
        path = self._state_file
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"cannot read board state {path}: {exc}") from None
        if not isinstance(data, dict) or not all(
                isinstance(k, str) and valid_topic(k) and isinstance(v, list)
                and all(isinstance(u, str) and valid_username(u) for u in v)
                for k, v in data.items()):
            raise ConfigurationError(
                f"board state {path} is malformed: expected {{\"owner/name\": [\"user\", ...]}}")
        return {k: tuple(v) for k, v in data.items()}

    def _save_members(self, state: dict[str, tuple[str, ...]]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._state_file.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            json.dump({k: list(v) for k, v in sorted(state.items())}, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._state_file)

    # -- threads and connections

    def _spawn(self, target: Callable[..., object], name: str, *args: object) -> None:
        def run() -> None:
            try:
                target(*args)
            except Exception:
                log.exception("unexpected error in %s", name)
            finally:
                with self._cond:
                    self._threads.discard(threading.current_thread())

        thread = threading.Thread(target=run, name=name, daemon=True)
        with self._cond:
            self._threads.add(thread)
        thread.start()

    def _join_threads(self, deadline: float) -> None:
        me = threading.current_thread()
        while True:
            with self._cond:
                alive = [t for t in self._threads if t is not me]
            remaining = deadline - time.monotonic()
            if not alive or remaining <= 0:
                break
            alive[0].join(remaining)
        if alive:
            log.warning("board stop: %d threads still running", len(alive))

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _accept_loop(self) -> None:
        assert self._listener is not None and self._wake_r is not None
        with self._listener, selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping:
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r:
                        return
                    try:
                        sock, addr = self._listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:  # e.g. out of file descriptors: back off
                        log.warning("board accept failed: %s", exc)
                        sel.select(0.5)
                        continue
                    self._spawn(self._serve, f"board-conn-{addr[0]}:{addr[1]}", sock, addr)

    def _serve(self, sock: socket.socket, addr: tuple) -> None:
        sock.setblocking(True)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        transport = _Transport(sock)
        conn = _Connection(transport, sock, f"{addr[0]}:{addr[1]}")
        with self._cond:
            stopping = self._stopping
            if not stopping:
                self._connections.add(conn)
        if stopping:
            transport.close()
            sock.close()
            return
        try:
            transport.set_keepalive(KEEPALIVE)
            transport.add_server_key(self.host_key)
            try:
                transport.start_server(server=_Interface(self, conn))
            except (paramiko.SSHException, EOFError, OSError) as exc:
                log.debug("SSH handshake with %s failed: %s", conn.address, exc)
                return
            transport.join(AUTH_TIMEOUT)
            if transport.is_alive() and not transport.is_authenticated():
                log.info("%s did not authenticate in time", conn.address)
                transport.close()
            transport.join()
        finally:
            transport.close()
            sock.close()
            with self._cond:
                self._connections.discard(conn)
                sessions = list(conn.sessions)
                self._cond.notify_all()
            for session in sessions:
                session.stop(1, None)

    # -- sessions

    def _queue_session(self, conn: _Connection, channel: paramiko.Channel,
                       command: bytes | None) -> bool:
        transport, chanid = conn.transport, channel.get_id()
        if chanid in transport.started:
            return False  # one command per channel
        transport.started.add(chanid)
        transport.pending_starts[chanid] = lambda: self._spawn(
            self._run_session, f"board-session-{conn.address}", conn, channel, command)
        return True

    def _run_session(self, conn: _Connection, channel: paramiko.Channel,
                     command: bytes | None) -> None:
        try:
            if command is None:
                return _close(channel, 1, err=SHELL_USAGE)
            if conn.user is None or conn.transport.get_username() != conn.user:
                return _close(channel, 1, err="not authenticated")
            try:
                cmd = parse(command.decode("utf-8"), conn.user)
            except UnicodeDecodeError:
                raise CommandError("command is not valid UTF-8") from None
            log.debug("%s@%s: %s", conn.user, conn.address, cmd.to_line())
            if cmd.name == "help":
                _close(channel, 0, out=HELP)
            elif cmd.name == "user":
                _close(channel, 0, out=conn.user + "\n")
            elif cmd.name == "ls":
                _close(channel, 0, out=self._ls(conn.user))
            else:
                self._stream(conn, channel, cmd)
        except CommandError as exc:
            _close(channel, 1, err=str(exc))
        except Exception:
            log.exception("board session of %s failed", conn.user)
            _close(channel, 1, err="internal error")

    def _stream(self, conn: _Connection, channel: paramiko.Channel, cmd: Command) -> None:
        with self._cond:
            self._serial += 1
            session = _Session(self, conn, channel, cmd, self._serial)
        try:
            self._join(session)
        except _Refused as exc:
            return _close(channel, 1, err=str(exc))
        try:
            if cmd.name == "sub":
                self._spawn(session.watch, f"board-watch-{session.client_id}")
                session.write_loop()
            elif cmd.name == "pipe":
                self._spawn(session.pipe_input, f"board-read-{session.client_id}")
                session.write_loop()
            else:
                if cmd.block and not self._wait_receivers(session, cmd.timeout):
                    session.end(1, "timeout reached, exiting")
                else:
                    session.read_loop(relay=True)
        finally:
            session.finish()

    def _join(self, session: _Session) -> None:
        """Check access (setting the access list if the owner gave one) and register."""
        cmd, user, name = session.cmd, session.user, session.topic
        if cmd.access is not None:
            if user != cmd.owner:
                raise _Refused(f"only {cmd.owner} can set the access list of {name}")
            try:
                self.set_members(name, list(cmd.access))
            except OSError as exc:
                log.error("cannot save board state: %s", exc)
                raise _Refused(f"cannot save the access list: {exc.strerror}") from None
        with self._cond:
            if self._stopping:
                raise _Refused("board is shutting down")
            if not self._allowed(user, name):
                log.info("access denied: %s to %s", user, name)
                raise _Refused("access denied")
            topic = self._topics.setdefault(name, _Topic())
            if cmd.name == "pub":
                topic.pubs.append(session)
                for r in topic.receivers:
                    r.saw_publisher = True
            else:
                session.saw_publisher = bool(topic.pubs)
                topic.receivers.append(session)
            self._sessions.add(session)
            session.conn.sessions.add(session)
            self._cond.notify_all()

    def _leave(self, session: _Session) -> None:
        """Take ``session`` off its topic: it gets no more lines, and may end plain subs."""
        with self._cond:
            topic = self._topics.get(session.topic)
            if topic is not None:
                for group in (topic.pubs, topic.receivers):
                    if session in group:
                        group.remove(session)
                if session.cmd.name == "pub" and not topic.pubs:
                    for r in topic.receivers:  # last publisher gone: plain subs end
                        if r.cmd.name == "sub" and not r.cmd.keep and r.saw_publisher:
                            assert r.outbox is not None
                            r.outbox.close()
                if not topic.pubs and not topic.receivers:
                    del self._topics[session.topic]
            self._cond.notify_all()

    def _forget(self, session: _Session) -> None:
        """``session`` has sent its exit status: stop() need not wait for it."""
        with self._cond:
            self._sessions.discard(session)
            session.conn.sessions.discard(session)
            self._cond.notify_all()

    def _wait_receivers(self, session: _Session, timeout: float | None) -> bool:
        """pub -b: wait for a sub or pipe on the topic; False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(
                lambda: session.ending or bool(self._receivers(session.topic)), timeout)

    def _receivers(self, name: str) -> list[_Session]:
        topic = self._topics.get(name)
        return topic.receivers if topic is not None else []

    def _relay(self, sender: _Session, line: bytes) -> None:
        """Queue ``line`` for every receiver of the topic, in one order for all."""
        if (self.verify_sender and line.startswith(b"{")
                and not check_sender(line[:-1], sender.user, sender.key)):
            with self._cond:
                self.dropped["bad-sender"] += 1
            log.debug("dropped a line from %s not signed by its own key", sender.client_id)
            return
        slow: list[_Session] = []
        with self._cond:
            for r in self._receivers(sender.topic):
                if r is sender and not sender.cmd.replay:
                    continue
                assert r.outbox is not None
                if not r.outbox.offer(line):
                    slow.append(r)
            if slow:
                self.dropped["too-slow"] += len(slow)
        for r in slow:
            log.info("%s on %s is too slow, disconnecting", r.client_id, r.topic)
            r.stop(1, "too slow, disconnecting")

    def _ls(self, user: str) -> str:
        """The caller's topics, live or with an access list, in pico.sh's format."""
        with self._cond:
            names = sorted({n for n in (*self._topics, *self._members)
                            if n.split("/", 1)[0] == user})
            if not names:
                return "no pubsub channels found\n"
            lines = ["Channel Information"]
            for name in names:
                members = self._members.get(name)
                acl = f" (Access List: {', '.join(members)})" if members is not None else ""
                lines.append(f"- {name}:{acl}")
                topic = self._topics.get(name) or _Topic()
                groups: Iterable[tuple[str, list[_Session]]] = (
                    ("Pubs", topic.pubs),
                    ("Subs", [s for s in topic.receivers if s.cmd.name == "sub"]),
                    ("Pipes", [s for s in topic.receivers if s.cmd.name == "pipe"]))
                for label, group in groups:
                    if group:
                        lines.append(f"  {label}:")
                        lines += [f"  - {s.client_id}" for s in group]
            return "\n".join(lines) + "\n"
