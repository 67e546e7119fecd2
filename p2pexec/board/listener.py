"""The board's door: its listening socket, and each TCP connection's life from accept to close.

    accept thread ──► admit (.admission: per-source limits, the members' reserve) ──► connection thread
    admission thread: closes connections past their key-exchange or login deadline
    connection thread: SSH handshake (paramiko, .ssh_transport), then waits for the connection to end

Which connections get in, and how long they may take to log in,
:mod:`.admission` decides, purely; this module does what it says with real
sockets and threads.  Hanging up is gentle (half-close, then a moment for the
client to hang up itself) so that clients read their exit status.  Every call
into the hub or the admission happens under the board's one lock.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import paramiko

from .admission import Admission, Limits, LogLimiter
from .hub import Hub
from .sessions import StreamSession
from .ssh_transport import BoardTransport
from .threads import Threads

log = logging.getLogger("p2pexec.board")

KEEPALIVE = 15           # seconds between SSH keepalives on every connection
LIMIT_LOG_INTERVAL = 60.0  # at most one log line per admission limit this often, with the count
STOP_GRACE = 2.0         # time for sessions to send their exit status (a stop, a revoked key)
LINGER = 1.0             # time for clients to hang up after that
ACCEPT_BACKLOG = 1024     # connections the kernel queues for accept()
ACCEPT_BATCH = 64         # connections accepted per wake-up of the accept thread


@dataclass(eq=False)
class Connection:
    """One TCP connection; who it logged in as, the hub knows (``hub.login(conn)``)."""

    transport: BoardTransport
    sock: socket.socket
    address: str
    sessions: set[StreamSession] = field(default_factory=set)  # until they have sent their exit status


class Listener:
    """The listening socket, the admission of connections and their threads, and hanging them up.

    ``interface(conn)`` is the paramiko server interface a connection's handshake and login talk to
    (:class:`.ssh_auth.Interface`).
    """

    def __init__(self, cond: threading.Condition, hub: Hub[Connection, paramiko.Channel], threads: Threads, *,
                 host_key: paramiko.PKey, limits: Limits,
                 interface: Callable[[Connection], paramiko.ServerInterface]) -> None:
        self._cond = cond  # the board's one lock: guards the hub, the admission and the connections
        self._hub = hub
        self._threads = threads
        self._host_key = host_key
        self._limits = limits
        self._interface = interface
        self.admission: Admission[socket.socket] = Admission(limits)
        self.connections: set[Connection] = set()  # until their thread has closed them
        self._limit_log = LogLimiter(LIMIT_LOG_INTERVAL)
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None  # stop() wakes the accept loop through it
        self._wake_w: socket.socket | None = None

    @property
    def started(self) -> bool:
        return self._wake_w is not None

    def start(self, host: str, port: int) -> int:
        """Bind and listen, and start the accept and admission threads; the port bound."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # A long queue: while strangers' connections come and go, members' must not find it full
        # (their SYN would wait a second or more for its retry).  The kernel caps it at somaxconn.
        self._listener = socket.create_server((host, port), family=family, backlog=ACCEPT_BACKLOG)
        self._listener.setblocking(False)
        port = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._threads.spawn(self._accept_loop, "board-accept")
        self._threads.spawn(self._reap_loop, "board-admission")
        return port

    def wake(self) -> None:
        """The board is stopping: end the accept loop (it closes the listening socket)."""
        assert self._wake_w is not None
        self._wake_w.send(b"x")

    def close(self) -> None:
        """Close the wake-up pair, once the threads are done."""
        assert self._wake_w is not None and self._wake_r is not None
        self._wake_w.close()
        self._wake_r.close()

    def disconnect(self, conn: Connection) -> None:
        """End ``conn``'s sessions with ``access revoked`` and hang it up (its key was revoked)."""
        with self._cond:
            sessions = list(conn.sessions)
            self._hub.dropped["revoked"] += len(sessions)
        for session in sessions:
            session.stop(1, "access revoked")
        with self._cond:
            self._cond.wait_for(lambda: not conn.sessions, STOP_GRACE)
        self.hang_up([conn])

    def hang_up(self, connections: list[Connection]) -> None:
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
            self._cond.wait_for(lambda: self.connections.isdisjoint(connections), LINGER)
            left = [c for c in connections if c in self.connections]
        for conn in left:
            conn.transport.close()

    def _accept_loop(self) -> None:
        assert self._listener is not None and self._wake_r is not None
        with self._listener, selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._hub.stopping:
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
                            self._threads.spawn(self._serve, f"board-conn-{conn.address}", conn)

    def _admit(self, sock: socket.socket, addr: tuple) -> Connection | None:
        """Register a new TCP connection, or close it at once if a limit says so or the board is stopping."""
        address = f"{addr[0]}:{addr[1]}"
        with self._cond:  # only this thread adds connections: room now is room below
            refusal = "stopping" if self._hub.stopping else self.admission.connect(sock, addr[0], time.monotonic())
            if refusal is not None:
                self._hub.refused[refusal] += 1
                self._log_limit(refusal, f"refused connections: {refusal} (last from {address})")
            self._cond.notify_all()  # a new deadline for the reaper
        if refusal is not None:
            sock.close()
            return None
        sock.setblocking(True)
        conn = Connection(BoardTransport(sock, lambda: self._logged_in(sock)), sock, address)
        with self._cond:
            if not self._hub.stopping:
                self.connections.add(conn)
                return conn
            self.admission.closed(sock)
        sock.close()
        return None

    def _logged_in(self, sock: socket.socket) -> None:
        with self._cond:
            self.admission.authenticated(sock)
            self._cond.notify_all()

    def _log_limit(self, reason: str, text: str) -> None:
        """Log ``text`` with how many times it happened, at most once per LIMIT_LOG_INTERVAL per reason."""
        count = self._limit_log.hit(reason, time.monotonic())
        if count:
            log.warning("%s: %d since the last such line (at most one a minute)", text, count)

    def _reap_loop(self) -> None:
        """Close the connections that have not exchanged keys or logged in by their deadline."""
        with self._cond:
            while not self._hub.stopping:
                now = time.monotonic()
                for sock, reason in self.admission.tick(now):
                    self._hub.refused[reason] += 1
                    self._log_limit(reason, f"closed connections: {reason}")
                    try:
                        sock.shutdown(socket.SHUT_RDWR)  # wakes its threads; _serve closes it
                    except OSError:
                        pass
                self._cond.wait(min(self.admission.next_deadline() - now, 60.0))

    def _serve(self, conn: Connection) -> None:
        sock, transport = conn.sock, conn.transport
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        try:
            transport.set_keepalive(KEEPALIVE)
            transport.add_server_key(self._host_key)
            # paramiko's own timeouts only as a backstop: the reaper closes late connections
            transport.banner_timeout = transport.handshake_timeout = self._limits.handshake_timeout + 1
            transport.auth_timeout = self._limits.auth_timeout + 1
            try:
                transport.start_server(server=self._interface(conn))
            except (paramiko.SSHException, EOFError, OSError) as exc:
                log.debug("SSH handshake with %s failed: %s", conn.address, exc)
                return
            with self._cond:
                self.admission.handshaken(sock)
            transport.join()
        finally:
            transport.close()
            sock.close()
            with self._cond:
                self.admission.closed(sock)
                self.connections.discard(conn)
                self._hub.log_out(conn)
                sessions = list(conn.sessions)
                self._cond.notify_all()
            for session in sessions:
                session.stop(1, None)
