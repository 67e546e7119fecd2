"""The p2pexec board: a pico.sh-compatible pubsub SSH server (paramiko server mode), the SSH adapter
around the board's pure hub.

    socket ──► .listener: admission (.admission) ──► paramiko Transport ──► .ssh_auth: log in (hub)
                                                        │
                                    exec channel ──► .dispatch ──► hub.command (ls, members…)
                                                        │    └───► StreamSession (.sessions)
                                                        ▼                             │ lines
                                  hub (.hub): topics, access lists, relay policy ◄────┘
                                                        │ Relay(to=…), End, HangUp, Persist
                                  outboxes, channel closes, state files ◄──┘  (done outside the lock)

Threads (:mod:`.threads`): one accepts; one per connection runs the SSH handshake and waits
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

This class holds the pieces together and carries out the hub's actions
(:meth:`BoardServer._apply`); the door is :mod:`.listener`, paramiko's questions
:mod:`.ssh_auth`, each exec channel's command :mod:`.dispatch`, and the state
on disk :mod:`.statefile`.
"""

from __future__ import annotations

import collections
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import paramiko

from ..keys import Keyring
from ..logs import quiet_dependencies
from .admission import Admission, Limits
from .dispatch import Dispatcher
from .hub import Action, End, EndOutput, HangUp, Hub, Persist
from .listener import STOP_GRACE, Connection, Listener
from .relay_address import RelayAddress, relay_info
from .ssh_auth import Interface, load_or_create_host_key, raw_ed25519
from .statefile import CLUSTERS, REGISTRY, StateFiles, load_members, load_registry
from .threads import Threads
from .watcher import UsersFileWatcher

__all__ = ["BoardServer", "RelayAddress", "UsersFileWatcher", "dedicate_process", "load_or_create_host_key",
           "raw_ed25519"]

log = logging.getLogger("p2pexec.board")

JOIN_TIMEOUT = 5.0       # stop(): time for every thread to end
SWITCH_SECONDS = 0.05    # the interpreter's switch interval in a process that serves a board (Python's: 0.005)


def dedicate_process() -> None:
    """Set this process up to serve a board and little else (``p2pexec board``; never a user's process,
    where a board may be embedded).

    A board runs four threads per connection (paramiko's transport's and three of its own): 4,205 at
    1,000 workers, most of them waking for a moment and blocking again.  Every 5 ms (Python's switch
    interval) a thread that holds the GIL is made to hand it on to the next that waits: with thousands
    waiting, the thread routing a line waited its turn again and again.  With 50 ms, threads give the
    GIL up when they block, as they soon do: at 1,000 workers a request's first lease came within
    0.62-0.84 s at the 95th percentile instead of 1.6-3.4 s, for 0.50-0.56 ms of the board's CPU per
    task instead of 0.72-0.86 (runs in turns).
    """
    sys.setswitchinterval(SWITCH_SECONDS)


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
        self.hub: Hub[Connection, paramiko.Channel] = Hub(
            users, members=load_members(self.state_dir / CLUSTERS),
            registry=load_registry(self.state_dir / REGISTRY), verify_sender=verify_sender,
            lines_per_second=lines_per_second, sessions_per_user=sessions_per_user,
            topics_per_user=topics_per_user)
        self._cond = threading.Condition()  # guards the hub and the state of the pieces below
        self._threads = Threads(self._cond)
        self._listener = Listener(self._cond, self.hub, self._threads, host_key=host_key, limits=self.limits,
                                  interface=lambda conn: Interface(self, conn))
        self._dispatcher = Dispatcher(self._cond, self.hub, self._threads, apply=self._apply,
                                      relay_info=self._relay_info, max_line=max_line,
                                      subscriber_queue=subscriber_queue)
        self._started = False
        self._state = StateFiles(self.state_dir, self._members_snapshot, self._registry_snapshot)

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
    def _admission(self) -> Admission[socket.socket]:
        """Who is at the door, and how far each connection got (:mod:`.admission`); under ``_cond``."""
        return self._listener.admission

    # -- lifecycle

    def start(self) -> None:
        """Bind and listen (``port=0`` picks a free port, stored in ``self.port``)."""
        with self._cond:
            if self._started:
                raise RuntimeError("BoardServer.start() may be called once")
            self._started = True
        quiet_dependencies()  # paramiko logs each stranger's broken handshake at ERROR, with a traceback
        self.port = self._listener.start(self.host, self.port)
        self._state.start()
        log.info("board listening on %s port %d", self.host, self.port)

    def stop(self) -> None:
        """Close the listener and every session, and join the threads, in bounded time."""
        with self._cond:
            done = self.hub.stopping or not self._listener.started
            if not done:
                self.hub.stopping = True
                sessions = list(self._dispatcher.sessions)
                self._cond.notify_all()
        if done:
            return self._state.stop()  # saves what set_members() changed, started or not
        self._listener.wake()
        started = time.monotonic()
        for session in sessions:
            session.stop(1, "board is shutting down")
        with self._cond:
            self._cond.wait_for(lambda: not self._dispatcher.sessions, STOP_GRACE)
            connections = list(self._listener.connections)
        self._listener.hang_up(connections)
        self._threads.join(started + JOIN_TIMEOUT)
        self._listener.close()
        self._state.stop()
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

    def _log_in(self, conn: Connection, user: str, key: bytes) -> bool:
        with self._cond:
            return self.hub.log_in(conn, user, key, time.time())

    def _may_open_channel(self, conn: Connection) -> bool:
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

    def _queue_session(self, conn: Connection, channel: paramiko.Channel, command: bytes | None) -> bool:
        return self._dispatcher.queue(conn, channel, command)

    def _relay_info(self, conn: Connection) -> str:
        """Where members reach this board's relay: at the address they reached the board on."""
        return relay_info(self.relay, conn.sock.getsockname()[0], conn.sock.getpeername()[0])

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

    def _members_snapshot(self) -> dict[str, list[str]]:
        with self._cond:
            return self.hub.members_snapshot()

    def _registry_snapshot(self) -> dict[str, object]:
        with self._cond:
            return self.hub.registry.snapshot()

    # -- the hub's actions

    def _apply(self, actions: Iterable[Action], cluster: str | None = None) -> None:
        """Do what the hub decided; never under the lock.  A registry change is on disk when this returns
        (the client is about to be told it is done); OSError if it cannot be."""
        flush = False
        for action in actions:
            if isinstance(action, (End, EndOutput)):
                session = self._dispatcher.session(action.session)
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
                self._threads.spawn(self._listener.disconnect, f"board-revoke-{conn.address}", conn)
            elif isinstance(action, Persist) and action.what == "registry":
                self._state.registry.changed()
                flush = True
            elif isinstance(action, Persist):
                self._state.clusters.changed()
                if cluster is not None:
                    log.info("members of %s: %s", cluster, ", ".join(self.members(cluster) or ()) or "(owner only)")
        if flush and not self._state.registry.flush():
            raise OSError(f"cannot save {self._state.registry.path}")
