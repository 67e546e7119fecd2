"""The p2pexec board: a pico.sh-compatible pubsub SSH server (paramiko server mode), the SSH adapter
around the board's pure hub.

    socket ──► admission (.admission) ──► paramiko Transport ──► _Interface: log in (hub)
                                                        │
                                                exec channel ──► _run_session ──► hub.command (ls, members…)
                                                        │                   └───► StreamSession (.sessions)
                                                        ▼                             │ lines
                                  hub (.hub): topics, access lists, relay policy ◄────┘
                                                        │ Relay(to=…), End, HangUp, Persist
                                  outboxes, channel closes, state files ◄──┘  (done outside the lock)

Threads: one accepts; one per connection runs the SSH handshake and waits
for the connection to end; one per session (exec channel) runs it, and pipe
and sub sessions have a second one reading their channel.  Every call into
the hub happens under ``self._cond``, the one lock of the board; writes to
channels, closes and saving happen outside it, so a slow client or disk never
holds up the others.  A line is offered to its receivers' outboxes under the
lock, so that every receiver of a topic gets its lines in one order.

Every limit ends only the offending session (or connection), with a clear
message on its stderr and exit status 1, and is counted by reason: sessions
cut off midway in ``dropped`` (with dropped lines), sessions and connections
turned away at the door in ``refused``.  Which connections get in, and how
long they may take to log in, :mod:`.admission` decides; a thread of its own
closes those past their deadline.  The users can be replaced while
running (:meth:`BoardServer.set_users`, :class:`.watcher.UsersFileWatcher`):
whoever loses their key is disconnected, everyone else carries on.

Unlike pico.sh the board knows who sends each line, so it refuses p2pexec
messages signed by anyone but the session's own user and key, and it
enforces access lists, which survive restarts in ``state_dir/clusters.json``
(invitations, joins and signed member lists in ``state_dir/registry.json``).
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
from .admission import Admission, Limits, LogLimiter
from .commands import Command, CommandError, parse, valid_topic
from .hub import STREAMS, Action, End, EndOutput, HangUp, Hub, Persist, Refused
from .registry import Registry
from .sessions import StreamSession, close_channel
from .ssh_transport import BoardTransport as _Transport
from .statefile import CoalescingWriter, read_state
from .watcher import UsersFileWatcher

__all__ = ["BoardServer", "RelayAddress", "UsersFileWatcher", "load_or_create_host_key", "raw_ed25519"]

log = logging.getLogger("p2pexec.board")

KEEPALIVE = 15           # seconds between SSH keepalives on every connection
LIMIT_LOG_INTERVAL = 60.0  # at most one log line per admission limit this often, with the count
STOP_GRACE = 2.0         # stop(): time for sessions to send their exit status
LINGER = 1.0             # stop(): time for clients to hang up after that
JOIN_TIMEOUT = 5.0       # stop(): time for every thread to end
ACCEPT_BACKLOG = 1024     # connections the kernel queues for accept()
ACCEPT_BATCH = 64         # connections accepted per wake-up of the accept thread
SHELL_USAGE = "this board runs commands, not a shell: ssh -T HOST help"


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


@dataclass(eq=False)
class _Connection:
    """One TCP connection; who it logged in as, the hub knows (``hub.login(conn)``)."""

    transport: "_Transport"
    sock: socket.socket
    address: str
    sessions: set[StreamSession] = field(default_factory=set)  # until they have sent their exit status


class _Interface(paramiko.ServerInterface):
    """Public-key authentication against the keyring; session channels only."""

    def __init__(self, board: "BoardServer", conn: _Connection) -> None:
        self._board = board
        self._conn = conn

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        raw = raw_ed25519(key)
        # paramiko asks before it checks the signature, but authentication can
        # only succeed right after this call and nothing is asked after it, so
        # the last login the hub records is the authenticated one.
        if raw is None or not self._board._log_in(self._conn, username, raw):
            log.debug("refused key for %r from %s", username, self._conn.address)
            return paramiko.AUTH_FAILED
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind != "session" or not self._board._may_open_channel(self._conn):
            return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        return self._board._queue_session(self._conn, channel, command)

    def check_channel_shell_request(self, channel: paramiko.Channel) -> bool:
        return self._board._queue_session(self._conn, channel, None)

    def check_channel_pty_request(self, *args: object) -> bool:
        return False


class BoardServer:
    """A pico.sh-pipe-compatible board over SSH, with real access control.

    Limits: ``max_line`` bytes a line, ``lines_per_second`` relayed per
    session (token bucket, bursts of ``max(10, 2 * rate)``), ``sessions_per_user``
    concurrent commands across all of a user's connections, ``topics_per_user``
    topics a user owns (live, or with an access list, which persists), and the
    connection limits and login deadlines of ``limits`` (see :class:`.admission.Limits`).
    The decisions are the hub's (``self.hub``, :class:`.hub.Hub`); this class does the I/O.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0,
                 host_key: paramiko.PKey, users: Keyring,
                 state_dir: Path,
                 verify_sender: bool = True,
                 max_line: int = 65536, subscriber_queue: int = 1000,
                 lines_per_second: float = 200.0, sessions_per_user: int = 32, topics_per_user: int = 100,
                 limits: Limits | None = None, relay: RelayAddress | None = None) -> None:
        if not (max_line > 0 and subscriber_queue > 0):
            raise ValueError("board limits must be positive")
        self.host, self.port = host, port
        self.host_key = host_key
        self.state_dir = Path(state_dir)
        self.max_line, self.subscriber_queue = max_line, subscriber_queue
        self.limits = limits or Limits()
        self.relay = relay  # told to members by the ``relay`` command
        self.hub: Hub[_Connection, paramiko.Channel] = Hub(
            users, members=self._load_members(), registry=self._load_registry(), verify_sender=verify_sender,
            lines_per_second=lines_per_second, sessions_per_user=sessions_per_user,
            topics_per_user=topics_per_user)
        self._cond = threading.Condition()  # guards the hub and all the state below
        self._sessions: set[StreamSession] = set()  # until they have sent their exit status
        self._by_id: dict[int, StreamSession] = {}  # the same, by the hub's session id
        self._connections: set[_Connection] = set()
        self._admission: Admission[socket.socket] = Admission(self.limits)
        self._limit_log = LogLimiter(LIMIT_LOG_INTERVAL)
        self._threads: set[threading.Thread] = set()
        self._started = False
        self._state_writer = CoalescingWriter(self._state_file, self._members_snapshot, mode=0o644)
        self._registry_writer = CoalescingWriter(self.state_dir / "registry.json", self._registry_snapshot)
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None  # stop() wakes the accept loop through it
        self._wake_w: socket.socket | None = None

    # -- the hub's settings and counters, as they were before it existed

    @property
    def users(self) -> Keyring:
        return self.hub.users  # type: ignore[return-value]

    @property
    def dropped(self) -> collections.Counter[str]:
        """Lines and sessions cut off, by reason."""
        return self.hub.dropped

    @property
    def refused(self) -> collections.Counter[str]:
        """Sessions and connections turned away at the door, by reason."""
        return self.hub.refused

    @property
    def relayed(self) -> int:
        """Lines accepted for relay (each counted once, however many receive it)."""
        return self.hub.relayed

    @property
    def _stopping(self) -> bool:
        return self.hub.stopping

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
        self._registry_writer.start()
        log.info("board listening on %s port %d", self.host, self.port)

    def stop(self) -> None:
        """Close the listener and every session, and join the threads, in bounded time."""
        with self._cond:
            done = self._stopping or self._wake_w is None
            if not done:
                self.hub.stopping = True
                sessions = list(self._sessions)
                self._cond.notify_all()
        if done:
            self._registry_writer.stop()
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
        self._registry_writer.stop()
        log.info("board on port %d stopped", self.port)

    def __enter__(self) -> "BoardServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- users and logins

    def set_users(self, users: Keyring) -> None:
        """Replace the users: connections whose key is no longer their user's are hung up
        (their sessions end with ``access revoked``); everyone else is untouched."""
        with self._cond:
            actions = self.hub.set_users(users, time.time())
        log.info("users replaced; %d connections revoked", len(actions))
        self._apply(actions)

    def knows(self, user: str, key: bytes) -> bool:
        """In the users file, or joined through an invitation."""
        with self._cond:
            return self.hub.knows(user, key)

    def _log_in(self, conn: _Connection, user: str, key: bytes) -> bool:
        with self._cond:
            return self.hub.log_in(conn, user, key, time.time())

    def _may_open_channel(self, conn: _Connection) -> bool:
        """Logged in, with a key that still opens the board (else it is hung up)."""
        with self._cond:
            if self.hub.login(conn) is None:
                return False
            if self.hub.still_allowed(conn, time.time()):
                return True
            revoke = self.hub.revoke(conn)  # users changed since it logged in
        if revoke:
            self._apply([HangUp(conn)])
        return False

    def _disconnect(self, conn: _Connection) -> None:
        with self._cond:
            sessions = list(conn.sessions)
            self.hub.dropped["revoked"] += len(sessions)
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

    # -- access lists

    def set_members(self, cluster: str, members: list[str]) -> None:
        """Set who besides its owner may join ``cluster`` (``owner/name``); saved within a moment.

        Sessions of users no longer listed are disconnected with ``access denied``.
        """
        with self._cond:
            actions = self.hub.set_members(cluster, members)
        self._apply(actions, cluster)

    def members(self, cluster: str) -> tuple[str, ...] | None:
        """The access list of ``cluster``, or None if its owner never set one."""
        with self._cond:
            return self.hub.members(cluster)

    def clients(self, topic: str) -> dict[str, int]:
        """How many pub, sub and pipe sessions ``topic`` has."""
        with self._cond:
            return self.hub.counts(topic)

    def wait_clients(self, topic: str, predicate: Callable[[dict[str, int]], bool],
                     timeout: float | None = None) -> bool:
        """Block until ``predicate(clients(topic))`` holds; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.hub.counts(topic)), timeout)

    @property
    def _state_file(self) -> Path:
        return self.state_dir / "clusters.json"

    def _load_members(self) -> dict[str, tuple[str, ...]]:
        path = self._state_file
        data = read_state(path)
        if data is None:
            return {}
        if not isinstance(data, dict) or not all(
                isinstance(k, str) and valid_topic(k) and isinstance(v, list)
                and all(isinstance(u, str) and valid_username(u) for u in v)
                for k, v in data.items()):
            raise ConfigurationError(
                f"board state {path} is malformed: expected {{\"owner/name\": [\"user\", ...]}}")
        return {k: tuple(v) for k, v in data.items()}

    def _load_registry(self) -> Registry:
        path = self.state_dir / "registry.json"
        try:
            return Registry(read_state(path))
        except ValueError:
            raise ConfigurationError(f"board state {path} is malformed") from None

    def _members_snapshot(self) -> dict[str, list[str]]:
        with self._cond:
            return self.hub.members_snapshot()

    def _registry_snapshot(self) -> dict[str, object]:
        with self._cond:
            return self.hub.registry.snapshot()

    def _apply(self, actions: Iterable[Action], cluster: str | None = None) -> None:
        """Do what the hub decided; never under the lock.  A registry change is on disk when this returns
        (the client is about to be told it is done); OSError if it cannot be."""
        flush = False
        for action in actions:
            if isinstance(action, (End, EndOutput)):
                with self._cond:
                    session = self._by_id.get(action.session)
                if session is None:
                    continue
                if isinstance(action, End):
                    session.stop(action.status, action.message)
                elif session.outbox is not None:
                    session.outbox.close()  # once drained, its write loop ends and so does the session
            elif isinstance(action, HangUp):
                conn = action.conn
                with self._cond:
                    login = self.hub.login(conn)
                log.info("access revoked: %s at %s", login.user if login else None, conn.address)
                self._spawn(self._disconnect, f"board-revoke-{conn.address}", conn)
            elif isinstance(action, Persist) and action.what == "registry":
                self._registry_writer.changed()
                flush = True
            elif isinstance(action, Persist):
                self._state_writer.changed()
                if cluster is not None:
                    log.info("members of %s: %s", cluster, ", ".join(self.members(cluster) or ()) or "(owner only)")
        if flush and not self._registry_writer.flush():
            raise OSError(f"cannot save {self._registry_writer.path}")

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
                self.hub.log_out(conn)
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
            close_channel(channel, status, out, err)

        user = None
        try:
            with self._cond:
                login = self.hub.login(conn)
                allowed = self.hub.still_allowed(conn, time.time())
            if login is None or conn.transport.get_username() != login.user:
                return close_channel(channel, 1, err="not authenticated")
            user = login.user
            if not allowed:
                return close_channel(channel, 1, err="access revoked")
            if not self._take_slot(user, channel):
                return close_channel(channel, 1, err=f"too many sessions for {user} "
                                                     f"(limit {self.hub.sessions_per_user})")
            if command is None:
                return done(1, err=SHELL_USAGE)
            try:
                cmd = parse(command.decode("utf-8"), user)
            except UnicodeDecodeError:
                raise CommandError("command is not valid UTF-8") from None
            log.debug("%s@%s: %s", user, conn.address, cmd.to_line())
            with self._cond:
                self.hub.check_command(conn, cmd)
            if cmd.name == "relay":
                done(0, out=self._relay_info(conn))
            elif cmd.name in STREAMS:
                self._stream(conn, channel, cmd)
            else:
                with self._cond:
                    out, actions = self.hub.command(conn, cmd, time.time())
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
            taken = self.hub.open(channel, user)
        if not taken:
            log.info("refused a session of %s: %d sessions running", user, self.hub.sessions_per_user)
        return taken

    def _release_slot(self, channel: paramiko.Channel) -> None:
        """Undo :meth:`_take_slot` (idempotent)."""
        with self._cond:
            self.hub.close(channel)

    def _stream(self, conn: _Connection, channel: paramiko.Channel, cmd: Command) -> None:
        session, refusal = None, "refused"
        with self._cond:
            try:
                state, actions = self.hub.join(conn, cmd, time.time(), time.monotonic())
            except Refused as exc:
                refusal, actions = str(exc), exc.actions
            else:
                session = StreamSession(self, conn, channel, state)
                self._by_id[session.id] = session
                self._sessions.add(session)
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

    def _leave(self, session: StreamSession) -> None:
        """Take ``session`` off its topic: it gets no more lines, and may end plain subs."""
        with self._cond:
            actions = self.hub.leave(session.id)
            self._cond.notify_all()
        self._apply(actions)

    def _forget(self, session: StreamSession) -> None:
        """``session`` has sent its exit status: stop() need not wait for it."""
        with self._cond:
            self._sessions.discard(session)
            self._by_id.pop(session.id, None)
            session.conn.sessions.discard(session)  # type: ignore[attr-defined]
            self._cond.notify_all()

    def _wait_receivers(self, session: StreamSession, timeout: float | None) -> bool:
        """pub -b: wait for a sub or pipe on the topic; False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(
                lambda: session.ending or self.hub.has_receivers(session.topic), timeout)

    def _relay(self, session: StreamSession, line: bytes) -> bool:
        """Queue ``line`` for the receivers the hub names, in one order for all; False if that ended
        ``session``.  The line's signature is checked before, outside the lock."""
        with self._cond:
            sender = self.hub.sender(session.id)
        if sender is None:
            return False
        checked = sender.check(line)
        slow: list[StreamSession] = []
        with self._cond:
            result = self.hub.relay(session.id, checked, time.monotonic())
            for sid in result.to:
                r = self._by_id.get(sid)
                if r is not None and r.outbox is not None and not r.outbox.offer(line):
                    slow.append(r)
            if slow:
                self.hub.dropped["too-slow"] += len(slow)
        if result.refusal is not None:
            log.debug("dropped a line from %s on %s: %s", session.client_id, session.topic, result.refusal)
        for r in slow:
            log.info("%s on %s is too slow, disconnecting", r.client_id, r.topic)
            r.stop(1, "too slow, disconnecting")
        if result.end is not None:
            log.info("%s on %s exceeds %g lines/s, disconnecting",
                     session.client_id, session.topic, self.hub.lines_per_second)
            session.end(result.end.status, result.end.message)
            session.finish()
            return False
        return True

    def _drop(self, reason: str) -> None:
        """A session broke a limit and is being ended: count it."""
        with self._cond:
            self.hub.dropped[reason] += 1

    def _relay_info(self, conn: _Connection) -> str:
        """Where members reach this board's relay: at the address they reached the board on."""
        here, there = conn.sock.getsockname()[0], conn.sock.getpeername()[0]
        addrs = list(self.relay.announce) if self.relay else []
        if self.relay and not addrs:
            proto = "ip6" if ":" in here else "ip4"
            addrs = [f"/{proto}/{here}/tcp/{self.relay.port}/p2p/{self.relay.peer_id}"]
        return json.dumps({"relays": addrs, "seen": there}) + "\n"
