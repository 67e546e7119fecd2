"""The board client: one ``pipe`` session on a cluster's topic, over paramiko.

Only commands pico.sh has are used (``pipe TOPIC -r -c``), so the same
client works against pico.sh and ``p2pexec board``.  Joining is confirmed by
seeing our own first line come back (``-r``): that proves the topic accepted
us and relays, and turns a silent refusal into a clear error.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import queue
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import paramiko

from ..errors import (
    AccessDeniedError,
    AuthenticationError,
    BoardBusyError,
    BoardConnectionError,
    BoardError,
    HostKeyError,
)
from ..keys import Identity
from ..membership import Membership
from ..protocol.messages import Inbox, Message
from .address import BoardAddress, known_hosts_name

log = logging.getLogger("p2pexec.board")

DEFAULT_BOARD = "pipe.pico.sh"
DEFAULT_KNOWN_HOSTS = Path("~/.ssh/known_hosts")
_MAX_BUFFERED = 1 << 20
# How long joining keeps trying a board that is busy (see BoardBusyError) before it gives up.
JOIN_WITHIN = 60.0
# The longest wait between tries of a worker that started while its board could not be reached.
MAX_START_DELAY = 10.0
# The longest wait between tries to reconnect, and how often a board still away is mentioned (at INFO).
MAX_RECONNECT_DELAY = 5.0
REMIND_SECONDS = 600.0


class _Backoff:
    """Delays between tries: doubling up to a cap, jittered (members cut off together, by a board restart or a
    flood, must not all come back at the same instant)."""

    def __init__(self, first: float, cap: float) -> None:
        self.delay, self.cap = first, cap

    def next(self, cap: float | None = None) -> float:
        wait = self.delay * random.uniform(0.5, 1.5)
        self.delay = min(2 * self.delay, self.cap if cap is None else cap)
        return wait


def fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class _HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    def __init__(self, address: BoardAddress, known_hosts: Path, accept_new: bool) -> None:
        self.address, self.known_hosts, self.accept_new = address, known_hosts, accept_new

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        name = known_hosts_name(self.address)
        if not self.accept_new:
            raise HostKeyError(
                f"the board {name} is not in {self.known_hosts}; its host key is "
                f"{key.get_name()} {fingerprint(key)}. If that is the fingerprint its owner gave "
                f"you, accept it with accept_new_host_key=True (--accept-new-host-key), or run: "
                f"ssh-keyscan -p {self.address.port} {self.address.host} >> {self.known_hosts}"
            )
        self.known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.known_hosts, "a") as f:
            f.write(f"{name} {key.get_name()} {key.get_base64()}\n")
        log.warning("added the board's host key %s %s to %s", name, fingerprint(key), self.known_hosts)


def _shed(exc: paramiko.AuthenticationException) -> bool:
    """Did the login run out of time or lose its connection, rather than the board refuse our key?

    paramiko raises the same exception for both; only its words tell them
    apart (``tests/test_board_client.py`` fails if they change).  A busy
    board that sheds connections during login must get another try, not a
    member told to ask for an invitation they already have.
    """
    text = str(exc)
    return type(exc) is paramiko.AuthenticationException and (
        text == "Authentication timeout." or text.startswith("Authentication failed: transport shut down"))


def connect(address: BoardAddress, identity: Identity, known_hosts: Path = DEFAULT_KNOWN_HOSTS,
            accept_new_host_key: bool = False, timeout: float = 10.0,
            cluster: str = "OWNER/NAME") -> paramiko.SSHClient:
    """An authenticated SSH connection to the board, or a BoardError that says what to do (about
    ``cluster``, where the caller knows it)."""
    known_hosts = Path(known_hosts).expanduser()
    client = paramiko.SSHClient()
    if known_hosts.exists():
        try:
            client.load_host_keys(str(known_hosts))
        except (OSError, paramiko.SSHException) as exc:
            raise HostKeyError(f"cannot read {known_hosts}: {exc}") from None
    client.set_missing_host_key_policy(_HostKeyPolicy(address, known_hosts, accept_new_host_key))
    where = f"{address.host}:{address.port}"
    try:
        sock = socket.create_connection((address.host, address.port), timeout=timeout)
        # SSH handshakes are chains of small writes: Nagle plus delayed ACKs costs 40 ms a stall.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.connect(address.host, address.port, sock=sock, username=identity.user, pkey=identity.pkey,
                       allow_agent=False, look_for_keys=False, timeout=timeout,
                       banner_timeout=timeout, auth_timeout=timeout)
    except HostKeyError:
        client.close()
        raise
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise HostKeyError(
            f"the board {where} presented host key {fingerprint(exc.key)}, but {known_hosts} "
            f"expects {fingerprint(exc.expected_key)}. Someone may be intercepting the connection; "
            f"if the board's owner really changed its key, remove the old line from {known_hosts}"
        ) from None
    except paramiko.AuthenticationException as exc:
        client.close()
        if _shed(exc):
            raise BoardBusyError(f"the board at {where} did not finish logging us in ({exc}): it is busy, or "
                                 f"flooded") from None
        raise AuthenticationError(
            f"the board {where} rejected user {identity.user!r} with key {identity.where}. "
            f"Ask the cluster's owner for an invitation (p2pexec invite {cluster} {identity.user}) and "
            f"run p2pexec join CODE, or ask the board's owner to add your public key to its users file "
            f"({identity.user} {identity.openssh_public})"
        ) from None
    except (OSError, EOFError, paramiko.SSHException) as exc:
        client.close()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        # Nothing listens, or no such host: trying again will not help.  Anything else (a timeout, a
        # connection closed before login) is what a busy or flooded board does to connections it sheds.
        final = isinstance(exc, (ConnectionRefusedError, socket.gaierror))
        raise (BoardConnectionError if final else BoardBusyError)(
            f"cannot reach the board at {where}: {reason}. Check the address (board=..., P2PEXEC_BOARD, or "
            f"the one p2pexec join saved) and that the board is running (to run one: p2pexec board)"
        ) from None
    return client


def exec_command(client: paramiko.SSHClient, command: str, timeout: float = 10.0) -> tuple[int, str, str]:
    """Run one board command on an open connection: (exit status, stdout, stderr), at most 1 MiB each."""
    transport = client.get_transport()
    if transport is None:
        raise BoardConnectionError("the connection to the board is closed")
    try:
        channel = transport.open_session(timeout=timeout)
        channel.settimeout(timeout)
        channel.exec_command(command)
        out = err = b""
        while len(out) < 1 << 20 and (chunk := channel.recv(65536)):
            out += chunk
        while len(err) < 1 << 20 and (chunk := channel.recv_stderr(65536)):
            err += chunk
        status = channel.recv_exit_status()
        channel.close()
    except (OSError, EOFError, paramiko.SSHException) as exc:
        raise BoardConnectionError(f"the board dropped the command {command.split()[0]!r}: {exc}") from None
    return status, out.decode(errors="replace"), err.decode(errors="replace").strip()


class BoardSession:
    """A ``pipe`` session on one topic that reconnects with backoff until closed.

    Lines from others are checked by ``inbox`` in the reader thread (parsing
    and signature checks stay off the caller's event loop, whatever a
    flooder sends); ``on_message`` gets the valid ones, in order.
    ``make_hello`` builds the signed line sent first on every
    (re)connection, whose echo confirms the join; ``on_connect`` runs after
    every successful reconnection so the owner can re-announce its state.
    """

    def __init__(self, address: BoardAddress, identity: Identity, topic: str, *,
                 inbox: Inbox, on_message: Callable[[Message], None], make_hello: Callable[[], bytes],
                 on_connect: Callable[[], None] = lambda: None,
                 on_refused: Callable[[AuthenticationError], None] = lambda exc: None,
                 known_hosts: Path = DEFAULT_KNOWN_HOSTS, accept_new_host_key: bool = False,
                 pipe_flags: str = "", timeout: float = 10.0) -> None:
        self.address = address
        self.identity = identity
        self.username = identity.user
        self.topic = topic
        self._pipe_flags = f" {pipe_flags}" if pipe_flags else ""
        self.inbox = inbox
        self._on_message = on_message
        self._make_hello = make_hello
        self._on_connect = on_connect
        self._on_refused = on_refused
        self._known_hosts = Path(known_hosts).expanduser()
        self._accept_new = accept_new_host_key
        self._timeout = timeout
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._client: paramiko.SSHClient | None = None
        self._channel: paramiko.Channel | None = None
        self._sent: deque[bytes] = deque(maxlen=256)
        self._reader: threading.Thread | None = None
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self.connected = threading.Event()

    # -- public -----------------------------------------------------------------
    def open(self, within: float | None = JOIN_WITHIN) -> None:
        """Connect and join, raising a precise BoardError if that is impossible.

        A busy board (:class:`BoardBusyError`) gets more tries, with jittered
        backoff, for up to ``within`` seconds.  With ``within=None`` (a
        worker, which may start before its board or its network) a board
        that cannot be reached at all gets them too, until it answers or
        :meth:`close`; a wrong host key or a refused key still fail at once.
        """
        deadline = math.inf if within is None else time.monotonic() + within
        backoff, failed_since = _Backoff(0.25, MAX_START_DELAY), None
        while True:
            try:
                pending = self._connect()
                break
            except BoardConnectionError as exc:
                busy = isinstance(exc, BoardBusyError)
                wait = backoff.next(4.0 if busy else None)
                if (not busy and within is not None) or time.monotonic() + wait > deadline:
                    raise
                if busy:
                    log.info("the board %s is busy (%s); trying again in %.1f s", self.address, exc, wait)
                elif failed_since is None:
                    log.warning("%s; trying again every few seconds until it answers (Ctrl-C to stop)", exc)
                else:
                    log.debug("the board is still unreachable (%s); next try in %.1f s", exc, wait)
                if not busy and failed_since is None:
                    failed_since = time.monotonic()
                if self._closed.wait(wait):
                    raise BoardConnectionError("closed before the board could be reached") from None
        if self._closed.is_set():  # (closed while connecting: nobody wants this session any more)
            self._disconnect()
            raise BoardConnectionError("closed before the board could be reached")
        if failed_since is not None:
            log.warning("reached the board %s after %.0f s", self.address, time.monotonic() - failed_since)
        self._sync_members()
        self._reader = threading.Thread(target=self._read_forever, args=(pending,),
                                        name=f"p2pexec-board-{self.topic}", daemon=True)
        self._reader.start()
        self._writer = threading.Thread(target=self._write_forever, name=f"p2pexec-board-w-{self.topic}",
                                        daemon=True)
        self._writer.start()

    def send(self, line: bytes) -> None:
        """Queue one line without blocking; lines sent while disconnected are dropped
        (everything still wanted is re-announced after reconnecting)."""
        self._outbox.put(line)

    def close(self, last_line: bytes | None = None) -> None:
        """Send ``last_line`` (if connected), then disconnect for good."""
        if last_line is not None:
            self._outbox.put(last_line)
        self._outbox.put(None)
        if self._writer is not None:
            self._writer.join(timeout=2)
        self._closed.set()
        self._disconnect()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=5)

    def ask_relay(self) -> tuple[list[str], str | None]:
        """The board's relay addresses and our IP as the board sees it: ``([], None)`` if it has none.

        pico.sh has no ``relay`` command and answers with an error, which
        means "no relay here"; so does an older ``p2pexec board``.
        """
        try:
            status, out, _ = self.command("relay")
            answer = json.loads(out) if status == 0 else {}
        except (BoardError, ValueError) as exc:
            log.debug("the board did not say where its relay is: %s", exc)
            return [], None
        relays = answer.get("relays") if isinstance(answer, dict) else None
        seen = answer.get("seen") if isinstance(answer, dict) else None
        return ([a for a in relays if isinstance(a, str)][:8] if isinstance(relays, list) else [],
                seen if isinstance(seen, str) else None)

    def _sync_members(self) -> None:
        """Catch up with the owner's signed member list, which a p2pexec board keeps (pico.sh has none)."""
        members = self.inbox.keyring
        if not isinstance(members, Membership):
            return
        try:
            status, out, _ = self.command(f"members {self.topic}")
            members.apply_view(json.loads(out) if status == 0 else None)
        except (BoardError, ValueError):
            return

    def command(self, command: str) -> tuple[int, str, str]:
        """Run a one-shot board command on this session's connection (see :func:`exec_command`)."""
        with self._lock:
            client = self._client
        if client is None:
            raise BoardConnectionError("not connected to the board")
        return exec_command(client, command, self._timeout)

    def _write_forever(self) -> None:
        while (line := self._outbox.get()) is not None:
            with self._lock:
                channel = self._channel
                if channel is None:
                    continue
                self._sent.append(line)
            try:
                channel.sendall(line + b"\n")
            except (OSError, EOFError, paramiko.SSHException):
                pass  # the reader notices the broken session and reconnects

    # -- connection -----------------------------------------------------------
    def _connect(self) -> bytes:
        """Connect, exec the pipe, and wait for our hello's echo; returns leftover bytes."""
        client = connect(self.address, self.identity, self._known_hosts, self._accept_new, self._timeout,
                         self.topic)
        where = f"{self.address.host}:{self.address.port}"
        transport = client.get_transport()
        assert transport is not None
        transport.set_keepalive(15)
        channel: paramiko.Channel | None = None
        try:
            channel = transport.open_session(timeout=self._timeout)
            channel.exec_command(f"pipe {self.topic} -r -c{self._pipe_flags}")
            channel.settimeout(self._timeout)
            hello = self._make_hello()
            channel.sendall(hello + b"\n")
            leftover = self._await_echo(channel, hello)
            channel.settimeout(None)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            try:
                if channel is not None and channel.exit_status_ready():
                    self._raise_refusal(channel)  # refused before our hello went out
                raise BoardBusyError(f"the board at {where} dropped the session while joining: {exc}") from None
            finally:
                client.close()
        except BoardError:
            client.close()
            raise
        with self._lock:
            self._client, self._channel = client, channel
        self.connected.set()
        log.debug("joined %s on %s", self.topic, self.address)
        return leftover

    def _await_echo(self, channel: paramiko.Channel, hello: bytes) -> bytes:
        buf = b""
        while True:
            try:
                chunk = channel.recv(65536)
            except socket.timeout:  # a busy board, or a host that takes `pipe` and never echoes: tried again
                raise BoardBusyError(
                    f"the board did not relay our first message on {self.topic} within "
                    f"{self._timeout:g} s: it is busy, or {self.address} is not a pico-compatible pipe host"
                ) from None
            if not chunk:
                self._raise_refusal(channel)
            buf += chunk
            lines = buf.split(b"\n")
            for i, line in enumerate(lines[:-1]):
                if line == hello:
                    return b"\n".join(lines[i + 1 :])
            if len(buf) > _MAX_BUFFERED:
                buf = lines[-1]

    def _raise_refusal(self, channel: paramiko.Channel) -> None:
        status = channel.recv_exit_status() if channel.exit_status_ready() else -1
        err = b""
        while channel.recv_stderr_ready():
            err += channel.recv_stderr(65536)
        message = err.decode(errors="replace").strip() or f"exit status {status}"
        if "access denied" in message.lower():
            raise AccessDeniedError(
                f"the board refused user {self.username!r} access to cluster {self.topic}: {message}. "
                f"Ask its owner ({self.topic.split('/')[0]}) for an invitation (p2pexec invite {self.topic} "
                f"{self.username}), then run: p2pexec join CODE"
            )
        raise BoardError(f"the board closed the session on {self.topic}: {message}")

    def _disconnect(self) -> None:
        self.connected.clear()
        with self._lock:
            client, self._client, self._channel = self._client, None, None
        if client is not None:
            client.close()

    # -- reader thread -------------------------------------------------------------
    def _read_forever(self, pending: bytes) -> None:
        while not self._closed.is_set():
            self._pump(pending)
            self._disconnect()
            if self._closed.is_set():
                return
            log.warning("lost the connection to the board %s; reconnecting", self.address)
            pending = self._reconnect()

    def _pump(self, buf: bytes) -> None:
        channel = self._channel
        while channel is not None:
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if not line or line in self._sent:
                    continue
                msg = self.inbox.receive(line, time.time())
                if msg is None:
                    continue
                try:
                    self._on_message(msg)
                except Exception:
                    log.exception("error handling a board message")
            if len(buf) > _MAX_BUFFERED:
                log.debug("discarding an oversize line from the board")
                buf = b""
            try:
                chunk = channel.recv(65536)
            except (OSError, EOFError, paramiko.SSHException):
                return
            if not chunk:
                return
            buf += chunk

    def _reconnect(self) -> bytes:
        """Connect again, backing off, until it works, we close, or the board refuses us (``on_refused``).

        A board away for long (a week-long worker's board down for the night) is mentioned once, then every
        :data:`REMIND_SECONDS`, not at every try."""
        backoff, since = _Backoff(0.1, MAX_RECONNECT_DELAY), time.monotonic()
        told = since
        while not self._closed.wait(backoff.next()):
            try:
                pending = self._connect()
            except AuthenticationError as exc:  # it took us before: our key is gone from it
                self._closed.set()
                log.debug("the board's answer: %s", exc)
                owner = self.topic.partition("/")[0]
                self._on_refused(AuthenticationError(
                    f"the board no longer lets {self.username} in: {owner} removed you from {self.topic}, or "
                    f"your key from the board. To take part again, ask {owner} for an invitation (p2pexec "
                    f"invite {self.topic} {self.username}) and run p2pexec join CODE"))
                break
            except BoardError as exc:
                now = time.monotonic()
                if now - told >= REMIND_SECONDS:
                    log.info("the board is still away after %.0f min (%s); still trying every few seconds",
                             (now - since) / 60, exc)
                    told = now
                else:
                    log.debug("reconnecting to the board failed (%s)", exc)
                continue
            log.warning("reconnected to the board %s after %.0f s", self.address, time.monotonic() - since)
            self._sync_members()
            try:
                self._on_connect()
            except Exception:
                log.exception("error re-announcing after reconnect")
            return pending
        return b""
