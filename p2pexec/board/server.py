"""The p2pexec board: a pico.sh-compatible pubsub SSH server (paramiko server mode).

Threads: one accepts; one per connection runs the SSH handshake and waits
for the connection to end; one per session (exec channel) runs it, and pipe
and sub sessions have a second one reading their channel.  Relaying never
waits on a receiver: every sub and pipe has a bounded outbox drained by its
own thread, and one whose outbox overflows is disconnected, so a stalled
reader cannot stall its topic (as it can on pico.sh).

Every limit ends only the offending session (or connection), with a clear
message on its stderr and exit status 1, and is counted by reason: sessions
cut off midway in ``dropped`` (with dropped lines), sessions and connections
turned away at the door in ``refused``.  Which connections get in, and how
long they may take to log in, :mod:`.admission` decides; a thread of its own
closes those past their deadline.  The users can be replaced while
running (:meth:`BoardServer.set_users`, :class:`UsersFileWatcher`): whoever
loses their key is disconnected, everyone else carries on.

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

from ..errors import ConfigurationError
from ..logs import quiet_dependencies
from ..keys import ED25519, Keyring, generate_identity_file, parse_openssh_public, valid_username
from ..protocol.messages import route
from .admission import Admission, Limits, LogLimiter
from .commands import HELP, PUBLIC, Command, CommandError, parse, valid_topic
from .registry import INVITE_DAYS, Registry
from .statefile import CoalescingWriter
from .ssh_transport import BoardTransport as _Transport

log = logging.getLogger("p2pexec.board")

KEEPALIVE = 15           # seconds between SSH keepalives on every connection
LIMIT_LOG_INTERVAL = 60.0  # at most one log line per admission limit this often, with the count
MESSAGE_TIMEOUT = 1.0    # to send a last message to a client that does not read
STOP_GRACE = 2.0         # stop(): time for sessions to send their exit status
LINGER = 1.0             # stop(): time for clients to hang up after that
JOIN_TIMEOUT = 5.0       # stop(): time for every thread to end
CHUNK = 32768            # bytes read from a channel at once
BATCH = 65536            # bytes written to a receiver at once
ACCEPT_BACKLOG = 1024     # connections the kernel queues for accept()
ACCEPT_BATCH = 64         # connections accepted per wake-up of the accept thread
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


@dataclass(frozen=True)
class RelayAddress:
    """The relay that comes with this board: its libp2p peer id and TCP port, or fixed addresses."""

    peer_id: str
    port: int
    announce: tuple[str, ...] = ()  # full multiaddrs to tell instead (port forwarding, another host)


class _Bucket:
    """A token bucket: ``rate`` lines a second on average, bursts of ``max(10, 2 * rate)``."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = self.tokens = max(10.0, 2 * rate)
        self.last = time.monotonic()

    def take(self) -> bool:
        """Spend a token on one line; False if there is none left."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


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
    revoked: bool = False  # its key is no longer its user's: being hung up
    joining: bool = False  # logged in on an invitation: may only run ``join``


@dataclass(eq=False)
class _Topic:
    receivers: list["_Session"] = field(default_factory=list)  # subs and pipes
    pubs: list["_Session"] = field(default_factory=list)


class _Interface(paramiko.ServerInterface):
    """Public-key authentication against the keyring; session channels only."""

    def __init__(self, board: "BoardServer", conn: _Connection) -> None:
        self._board = board
        self._conn = conn

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        raw = raw_ed25519(key)
        known = raw is not None and self._board.knows(username, raw)
        if raw is None or not (known or self._board._invitee(username)):
            log.debug("refused key for %r from %s", username, self._conn.address)
            return paramiko.AUTH_FAILED
        self._conn.joining = not known
        # paramiko asks before it checks the signature, but authentication can
        # only succeed right after this call and nothing is asked after it, so
        # the last user and key recorded here are the authenticated ones.
        self._conn.user, self._conn.key = username, raw
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind != "session" or self._conn.user is None:
            return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        if not self._board._still_allowed(self._conn):  # users changed since it logged in
            self._board._revoke(self._conn)
            return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        return paramiko.OPEN_SUCCEEDED

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
        self.bucket = _Bucket(board.lines_per_second)
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
        # First, so that whoever sees the session gone from its topic may start another.
        self.board._release_slot(self.channel)
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
                        return self._drop("too-long", "line too long")
                    if not self._relay(bytes(line) + b"\n"):
                        return
            if len(buf) > limit:
                return self._drop("too-long", "line too long")
        if buf and self.channel.eof_received and not self.ending:  # a clean EOF, not a crash
            self._relay(bytes(buf) + b"\n")

    def _relay(self, line: bytes) -> bool:
        """Relay one line within the rate limit; False if that ended the session."""
        if not self.bucket.take():
            log.info("%s on %s exceeds %g lines/s, disconnecting",
                     self.client_id, self.topic, self.bucket.rate)
            self._drop("rate-limit", f"rate limit exceeded ({self.bucket.rate:g} lines/s), disconnecting")
            return False
        self.board._relay(self, line)
        return True

    def _drop(self, reason: str, message: str) -> None:
        """End this session for breaking a limit, counted in ``dropped`` by reason."""
        with self.board._cond:
            self.board.dropped[reason] += 1
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
    """A pico.sh-pipe-compatible board over SSH, with real access control.

    Limits: ``max_line`` bytes a line, ``lines_per_second`` relayed per
    session (token bucket, bursts of ``max(10, 2 * rate)``), ``sessions_per_user``
    concurrent commands across all of a user's connections, ``topics_per_user``
    topics a user owns (live, or with an access list, which persists), and the
    connection limits and login deadlines of ``limits`` (see :class:`.admission.Limits`).
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0,
                 host_key: paramiko.PKey, users: Keyring,
                 state_dir: Path,
                 verify_sender: bool = True,
                 max_line: int = 65536, subscriber_queue: int = 1000,
                 lines_per_second: float = 200.0, sessions_per_user: int = 32, topics_per_user: int = 100,
                 limits: Limits | None = None, relay: RelayAddress | None = None) -> None:
        if not (max_line > 0 and subscriber_queue > 0 and lines_per_second > 0 and sessions_per_user > 0
                and topics_per_user > 0):
            raise ValueError("board limits must be positive")
        self.host, self.port = host, port
        self.host_key, self.users = host_key, users
        self.state_dir = Path(state_dir)
        self.verify_sender = verify_sender
        self.max_line, self.subscriber_queue = max_line, subscriber_queue
        self.lines_per_second = lines_per_second
        self.sessions_per_user, self.topics_per_user = sessions_per_user, topics_per_user
        self.limits = limits or Limits()
        self.relay = relay  # told to members by the ``relay`` command
        self.dropped: collections.Counter[str] = collections.Counter()  # lines and sessions cut off
        self.refused: collections.Counter[str] = collections.Counter()  # turned away at the door
        self.relayed = 0  # lines accepted for relay (each counted once, however many receive it)
        self._cond = threading.Condition()  # guards all the state below
        self._topics: dict[str, _Topic] = {}
        self._members: dict[str, tuple[str, ...]] = self._load_members()
        self.registry = Registry(self.state_dir / "registry.json")
        self._registry_lock = threading.Lock()
        self._sessions: set[_Session] = set()
        self._connections: set[_Connection] = set()
        self._slots: dict[paramiko.Channel, str] = {}  # running commands -> their user
        self._user_slots: collections.Counter[str] = collections.Counter()
        self._admission: Admission[socket.socket] = Admission(self.limits)
        self._limit_log = LogLimiter(LIMIT_LOG_INTERVAL)
        self._threads: set[threading.Thread] = set()
        self._serial = 0
        self._started = self._stopping = False
        self._state_writer = CoalescingWriter(self._state_file, self._members_snapshot, mode=0o644)
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
        quiet_dependencies()  # paramiko logs each stranger's broken handshake at ERROR, with a traceback
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # A long queue: while strangers' connections come and go, members' must not find it full
        # (their SYN would wait a second or more for its retry).  The kernel caps it at somaxconn.
        self._listener = socket.create_server((self.host, self.port), family=family, backlog=ACCEPT_BACKLOG)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._spawn(self._accept_loop, "board-accept")
        self._spawn(self._reap_loop, "board-admission")
        self._state_writer.start()
        log.info("board listening on %s port %d", self.host, self.port)

    def stop(self) -> None:
        """Close the listener and every session, and join the threads, in bounded time."""
        with self._cond:
            done = self._stopping or self._wake_w is None
            if not done:
                self._stopping = True
                sessions = list(self._sessions)
                self._cond.notify_all()
        if done:
            return self._state_writer.stop()  # saves what set_members() changed, started or not
        assert self._wake_w is not None
        self._wake_w.send(b"x")
        started = time.monotonic()
        for session in sessions:
            session.stop(1, "board is shutting down")
        with self._cond:
            self._cond.wait_for(lambda: not self._sessions, STOP_GRACE)
            connections = list(self._connections)
        self._hang_up(connections)
        self._join_threads(started + JOIN_TIMEOUT)
        self._wake_w.close()
        assert self._wake_r is not None
        self._wake_r.close()
        self._state_writer.stop()
        log.info("board on port %d stopped", self.port)

    def __enter__(self) -> "BoardServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- users

    def set_users(self, users: Keyring) -> None:
        """Replace the users: connections whose key is no longer their user's are hung up
        (their sessions end with ``access revoked``); everyone else is untouched."""
        with self._cond:
            self.users = users
            revoked = [c for c in self._connections if c.user is not None and not c.revoked
                       and not self._still_allowed(c)]
        log.info("users replaced; %d connections revoked", len(revoked))
        for conn in revoked:
            self._revoke(conn)

    def _still_allowed(self, conn: _Connection) -> bool:
        if conn.user is None or conn.key is None:
            return False
        return self.knows(conn.user, conn.key) or (conn.joining and self._invitee(conn.user))

    def knows(self, user: str, key: bytes) -> bool:
        """In the users file, or joined through an invitation."""
        with self._registry_lock:
            return self.users.allows(user, key) or self.registry.allows(user, key)

    def _invitee(self, user: str) -> bool:
        """A name with an open invitation may log in with a new key, to run ``join`` and nothing else."""
        with self._registry_lock:
            return self.registry.invited(user)

    def _membership_command(self, conn: _Connection, cmd: Command) -> str:
        """``invite``, ``join`` and ``members``: see :mod:`.registry`."""
        cluster, owner, user = cmd.topic, cmd.owner, conn.user
        assert cluster is not None and user is not None and conn.key is not None
        if cmd.name == "join":
            with self._registry_lock:
                self.registry.join(cluster, user, conn.key, cmd.args[0])
                conn.joining = False
                return self.registry.view(cluster)
        if cmd.name == "invite" or cmd.args:
            if user != owner or not self.users.allows(user, conn.key):  # a users-file key, not an invitation's
                raise CommandError(f"only {owner}, with a key in this board's users file, may change who is "
                                   f"in {cluster}")
        else:
            with self._cond:
                allowed = self._allowed(user, cluster, conn.key)
            if not allowed:
                raise CommandError(f"access denied to {cluster}")
        if cmd.name == "invite":
            invitee, key = cmd.args
            if not valid_username(invitee):
                raise CommandError(f"invalid user name {invitee!r}")
            with self._registry_lock:
                self.registry.invite(cluster, invitee, key)
            return f"{invitee} may join {cluster} once within {INVITE_DAYS} days\n"
        if cmd.args:
            try:
                text = base64.b64decode(cmd.args[0], validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                raise CommandError("the member list must be base64 of its JSON") from None
            with self._cond:
                try:
                    self._check_room(cluster)
                except _Refused as exc:
                    raise CommandError(str(exc)) from None
            with self._registry_lock:
                signed = self.registry.set_list(cluster, conn.key, text)
            self.set_members(cluster, sorted(signed.members))
            return f"member list of {cluster} is version {signed.version}\n"
        with self._registry_lock:
            return self.registry.view(cluster)

    def _revoke(self, conn: _Connection) -> None:
        """Hang up ``conn`` (once), its sessions first, from a thread of its own."""
        with self._cond:
            if conn.revoked or self._stopping:
                return
            conn.revoked = True
        log.info("access revoked: %s at %s", conn.user, conn.address)
        self._spawn(self._disconnect, f"board-revoke-{conn.address}", conn)

    def _disconnect(self, conn: _Connection) -> None:
        with self._cond:
            sessions = list(conn.sessions)
            self.dropped["revoked"] += len(sessions)
        for session in sessions:
            session.stop(1, "access revoked")
        with self._cond:
            self._cond.wait_for(lambda: not conn.sessions, STOP_GRACE)
        self._hang_up([conn])

    def _hang_up(self, connections: list[_Connection]) -> None:
        """Half-close, let clients hang up (LINGER), then close what is left.

        Half-closing first lets clients read their exit status; closing outright
        would reset connections that OpenSSH is still writing to.
        """
        for conn in connections:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        with self._cond:
            self._cond.wait_for(lambda: self._connections.isdisjoint(connections), LINGER)
            left = [c for c in connections if c in self._connections]
        for conn in left:
            conn.transport.close()

    # -- membership

    def set_members(self, cluster: str, members: list[str]) -> None:
        """Set who besides its owner may join ``cluster`` (``owner/name``); saved within a moment.

        Sessions of users no longer listed are disconnected with ``access denied``.
        """
        if not valid_topic(cluster) or cluster.startswith(PUBLIC + "/"):
            raise ValueError(f"invalid cluster {cluster!r}: expected OWNER/NAME, not public")
        bad = [m for m in members if not valid_username(m)]
        if bad:
            raise ValueError(f"invalid user names {bad}")
        new = tuple(dict.fromkeys(members))
        with self._cond:
            if self._members.get(cluster) == new:
                return
            self._members[cluster] = new
            topic = self._topics.get(cluster)
            sessions = (topic.receivers + topic.pubs) if topic else []
            revoked = [s for s in sessions if not self._allowed(s.user, cluster, s.key)]
        self._state_writer.changed()
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

    def _allowed(self, user: str, topic: str, key: bytes | None = None) -> bool:
        """By name, as pico does; and a key that only an invitation registered serves only its own clusters."""
        owner = topic.split("/", 1)[0]
        if owner == PUBLIC:
            return True
        if not (user == owner or user in self._members.get(topic, ())):
            return False
        if key is None or self.users.allows(user, key):
            return True
        with self._registry_lock:
            return self.registry.allows_in(topic, user, key)

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

    def _members_snapshot(self) -> dict[str, list[str]]:
        with self._cond:
            return {k: list(v) for k, v in sorted(self._members.items())}

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
        with self._cond:  # started under the lock: stop() never joins a thread that has not started
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
                    for _ in range(ACCEPT_BATCH):  # empty the queue while it is full, not one per wake-up
                        try:
                            sock, addr = self._listener.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError as exc:  # e.g. out of file descriptors: back off
                            log.warning("board accept failed: %s", exc)
                            sel.select(0.5)
                            break
                        conn = self._admit(sock, addr)
                        if conn is not None:
                            self._spawn(self._serve, f"board-conn-{conn.address}", conn)

    def _admit(self, sock: socket.socket, addr: tuple) -> _Connection | None:
        """Register a new TCP connection, or close it at once if a limit says so or the board is stopping."""
        address = f"{addr[0]}:{addr[1]}"
        with self._cond:  # only this thread adds connections: room now is room below
            refusal = "stopping" if self._stopping else self._admission.connect(sock, addr[0], time.monotonic())
            if refusal is not None:
                self.refused[refusal] += 1
                self._log_limit(refusal, f"refused connections: {refusal} (last from {address})")
            self._cond.notify_all()  # a new deadline for the reaper
        if refusal is not None:
            sock.close()
            return None
        sock.setblocking(True)
        conn = _Connection(_Transport(sock, lambda: self._logged_in(sock)), sock, address)
        with self._cond:
            if not self._stopping:
                self._connections.add(conn)
                return conn
            self._admission.closed(sock)
        sock.close()
        return None

    def _logged_in(self, sock: socket.socket) -> None:
        with self._cond:
            self._admission.authenticated(sock)
            self._cond.notify_all()

    def _log_limit(self, reason: str, text: str) -> None:
        """Log ``text`` with how many times it happened, at most once per LIMIT_LOG_INTERVAL per reason."""
        count = self._limit_log.hit(reason, time.monotonic())
        if count:
            log.warning("%s: %d since the last such line (at most one a minute)", text, count)

    def _reap_loop(self) -> None:
        """Close the connections that have not exchanged keys or logged in by their deadline."""
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                for sock, reason in self._admission.tick(now):
                    self.refused[reason] += 1
                    self._log_limit(reason, f"closed connections: {reason}")
                    try:
                        sock.shutdown(socket.SHUT_RDWR)  # wakes its threads; _serve closes it
                    except OSError:
                        pass
                self._cond.wait(min(self._admission.next_deadline() - now, 60.0))

    def _serve(self, conn: _Connection) -> None:
        sock, transport = conn.sock, conn.transport
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        try:
            transport.set_keepalive(KEEPALIVE)
            transport.add_server_key(self.host_key)
            # paramiko's own timeouts only as a backstop: the reaper closes late connections
            transport.banner_timeout = transport.handshake_timeout = self.limits.handshake_timeout + 1
            transport.auth_timeout = self.limits.auth_timeout + 1
            try:
                transport.start_server(server=_Interface(self, conn))
            except (paramiko.SSHException, EOFError, OSError) as exc:
                log.debug("SSH handshake with %s failed: %s", conn.address, exc)
                return
            with self._cond:
                self._admission.handshaken(sock)
            transport.join()
        finally:
            transport.close()
            sock.close()
            with self._cond:
                self._admission.closed(sock)
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
        def done(status: int, out: str = "", err: str | None = None) -> None:
            self._release_slot(channel)  # first: a client told we are done may start another
            _close(channel, status, out, err)

        try:
            if conn.user is None or conn.transport.get_username() != conn.user:
                return _close(channel, 1, err="not authenticated")
            if not self._still_allowed(conn):
                return _close(channel, 1, err="access revoked")
            if not self._take_slot(conn.user, channel):
                return _close(channel, 1, err=f"too many sessions for {conn.user} "
                                              f"(limit {self.sessions_per_user})")
            if command is None:
                return done(1, err=SHELL_USAGE)
            try:
                cmd = parse(command.decode("utf-8"), conn.user)
            except UnicodeDecodeError:
                raise CommandError("command is not valid UTF-8") from None
            log.debug("%s@%s: %s", conn.user, conn.address, cmd.to_line())
            if conn.joining and cmd.name not in ("join", "help"):
                raise CommandError(f"{conn.user} is invited here but has not joined: run p2pexec join CODE")
            if cmd.name in ("invite", "join", "members"):
                done(0, out=self._membership_command(conn, cmd))
            elif cmd.name == "help":
                done(0, out=HELP)
            elif cmd.name == "user":
                done(0, out=conn.user + "\n")
            elif cmd.name == "ls":
                done(0, out=self._ls(conn.user))
            elif cmd.name == "relay":
                done(0, out=self._relay_info(conn))
            else:
                self._stream(conn, channel, cmd)
        except CommandError as exc:
            done(1, err=str(exc))
        except Exception:
            log.exception("board session of %s failed", conn.user)
            done(1, err="internal error")
        finally:
            self._release_slot(channel)

    def _take_slot(self, user: str, channel: paramiko.Channel) -> bool:
        """Count a running command against ``user``'s sessions_per_user; False if over."""
        with self._cond:
            if self._user_slots[user] >= self.sessions_per_user:
                self.refused["sessions-per-user"] += 1
                log.info("refused a session of %s: %d sessions running", user, self.sessions_per_user)
                return False
            self._user_slots[user] += 1
            self._slots[channel] = user
            return True

    def _release_slot(self, channel: paramiko.Channel) -> None:
        """Undo :meth:`_take_slot` (idempotent)."""
        with self._cond:
            user = self._slots.pop(channel, None)
            if user is not None:
                self._user_slots[user] -= 1
                if not self._user_slots[user]:
                    del self._user_slots[user]

    def _stream(self, conn: _Connection, channel: paramiko.Channel, cmd: Command) -> None:
        with self._cond:
            self._serial += 1
            session = _Session(self, conn, channel, cmd, self._serial)
        try:
            self._join(session)
        except _Refused as exc:
            self._release_slot(channel)
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
            with self._cond:
                self._check_room(name)
            self.set_members(name, list(cmd.access))
        with self._cond:
            if self._stopping:
                raise _Refused("board is shutting down")
            self._check_room(name)
            if not self._still_allowed(session.conn):  # set_users() ran since _run_session began
                raise _Refused("access revoked")
            if not self._allowed(user, name, session.key):
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

    def _check_room(self, name: str) -> None:
        """Refuse a new topic (live or with an access list) to an owner who has topics_per_user already."""
        owner = name.split("/", 1)[0]
        if owner == PUBLIC or name in self._topics or name in self._members:
            return  # public topics live only as long as their sessions, which sessions_per_user bounds
        owned = {n for n in (*self._topics, *self._members) if n.split("/", 1)[0] == owner}
        if len(owned) >= self.topics_per_user:
            self.refused["topics-per-user"] += 1
            raise _Refused(f"{owner} has {len(owned)} topics on this board, the most it keeps for one user "
                           f"(topics_per_user); use one of them (see: ls)")

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
        """Queue ``line`` for every receiver of the topic, in one order for all.

        A topic with an access list is a cluster's: only the cluster's messages
        signed by the session's own user and key go out there (see
        :func:`route`); elsewhere, lines that are not messages too.  A message
        addressed to one member (an offer, a decline) goes to that member's
        sessions alone: the others would drop it anyway, and sending every
        offer to everyone grows with the square of the cluster.
        """
        to = None
        if self.verify_sender:
            with self._cond:
                cluster = sender.topic if sender.topic in self._members else None
            verdict = route(line[:-1], sender.user, sender.key, cluster)
            if verdict.refusal is not None:
                with self._cond:
                    self.dropped[verdict.refusal] += 1
                log.debug("dropped a line from %s on %s: %s", sender.client_id, sender.topic, verdict.refusal)
                return
            to = verdict.to
        slow: list[_Session] = []
        with self._cond:
            self.relayed += 1
            for r in self._receivers(sender.topic):
                if (r is sender and not sender.cmd.replay) or (to is not None and r.user != to and r is not sender):
                    continue
                assert r.outbox is not None
                if not r.outbox.offer(line):
                    slow.append(r)
            if slow:
                self.dropped["too-slow"] += len(slow)
        for r in slow:
            log.info("%s on %s is too slow, disconnecting", r.client_id, r.topic)
            r.stop(1, "too slow, disconnecting")

    def _relay_info(self, conn: _Connection) -> str:
        """Where members reach this board's relay: at the address they reached the board on."""
        here, there = conn.sock.getsockname()[0], conn.sock.getpeername()[0]
        addrs = list(self.relay.announce) if self.relay else []
        if self.relay and not addrs:
            proto = "ip6" if ":" in here else "ip4"
            addrs = [f"/{proto}/{here}/tcp/{self.relay.port}/p2p/{self.relay.peer_id}"]
        return json.dumps({"relays": addrs, "seen": there}) + "\n"

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


class UsersFileWatcher:
    """Keeps a board's users in step with its users file.

    ``start()`` polls the file's mtime, size and inode every ``interval``
    seconds and reloads it once it has stopped changing for one interval, so a
    file caught mid-write is not applied; ``reload()`` does it at once (the CLI
    calls it on SIGHUP).  A file that does not parse keeps the current users.
    """

    def __init__(self, server: BoardServer, path: Path, interval: float = 1.0) -> None:
        self.server, self.path, self.interval = server, Path(path), interval
        self.reloads = 0  # reload() calls that finished, applied or not
        self._cond = threading.Condition()  # also serialises reload()
        self._seen = self._stamp()  # the file as the server's users were read from it
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("UsersFileWatcher.start() may be called once")
        self._thread = threading.Thread(target=self._watch, name="board-users-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the watching thread, promptly."""
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def reload(self) -> bool:
        """Re-read the file and apply it; False (logged, users kept) if it cannot be read."""
        with self._cond:
            stamp = self._stamp()
            try:
                users = Keyring.load(self.path)
            except ConfigurationError as exc:  # its message names the file and line
                log.error("users not reloaded, keeping the current ones: %s", exc)
                applied = False
            else:
                self.server.set_users(users)
                log.info("reloaded users from %s", self.path)
                applied = True
            self._seen = stamp  # a bad file is reported once, not every interval
            self.reloads += 1
            self._cond.notify_all()
            return applied

    def wait_reloads(self, count: int, timeout: float | None = None) -> bool:
        """Block until ``reloads >= count``; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.reloads >= count, timeout)

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _watch(self) -> None:
        last = self._seen
        while not self._stopped.wait(self.interval):
            stamp = self._stamp()
            with self._cond:
                changed = stamp != self._seen
            if changed and stamp == last:  # changed, then stable for an interval
                try:
                    self.reload()
                except Exception:
                    log.exception("reloading users from %s failed", self.path)
            last = stamp
