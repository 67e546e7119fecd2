"""Strangers without a key flood the board from their own loopback addresses; members still get through.

Each attacker binds its own source address (127.0.0.2, 127.0.0.3, ...), so
the board's per-source limits are exercised on one machine.  Every loop is
bounded in count and time, and every socket is closed at the end.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paramiko
import pytest

from p2pexec.board.admission import Limits
from p2pexec.board.address import BoardAddress
from p2pexec.board.client import BoardSession
from p2pexec.board.server import BoardServer
from p2pexec.errors import BoardBusyError, BoardConnectionError
from p2pexec.keys import Keyring, load_identity
from p2pexec.protocol import messages

from .test_board_server import (  # noqa: F401 -- fixtures
    WAIT,
    Lines,
    channel,
    keydir,
    keyring,
    make_board,
    ssh,
    wait_clients,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """The attackers' sockets, all closed at teardown."""
    held: list[socket.socket] = []
    yield held
    for sock in held:
        sock.close()


def open_from(board: BoardServer, source: str, held: list[socket.socket]) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", board.port), timeout=WAIT, source_address=(source, 0))
    held.append(sock)
    return sock


def member_relays(board: BoardServer, ssh: Callable[..., subprocess.CompletedProcess[bytes]],
                  listener: Lines, text: bytes) -> float:
    """alice's real OpenSSH client publishes ``text`` to alice/t; seconds until her sub had it."""
    started = time.monotonic()
    result = ssh(board, "alice", "pub -b=false t", input=text)
    assert result.returncode == 0, (result.stderr, board.refused, board._admission._sources)  # noqa: SLF001
    assert listener.get() == text
    return time.monotonic() - started


def test_silent_sockets_from_one_address_do_not_lock_members_out(
        make_board: Callable[..., BoardServer], channel: Callable[..., paramiko.Channel],
        ssh: Callable[..., subprocess.CompletedProcess[bytes]], sockets: list[socket.socket],
        caplog: pytest.LogCaptureFixture) -> None:
    """The issue's flood: 302 silent sockets against a board of 100 connections locked everyone out."""
    caplog.set_level(logging.WARNING, logger="p2pexec.board")
    board = make_board(limits=Limits(max_connections=100))
    listener = Lines(channel(board, "alice", "sub -k t").makefile("rb"))
    wait_clients(board, "alice/t", sub=1)
    for _ in range(300):
        open_from(board, "127.0.0.2", sockets)
    for source in ("127.0.0.3", "127.0.0.4"):  # a few more addresses take only their own share
        for _ in range(50):
            open_from(board, source, sockets)
    sources = [f"127.0.0.{i}" for i in (2, 3, 4)]

    def handshakes() -> list[int]:
        return [board._admission.counts(s)["handshakes"] for s in sources]  # noqa: SLF001

    with board._cond:  # noqa: SLF001 -- until the board has taken in every socket
        assert board._cond.wait_for(  # noqa: SLF001
            lambda: sum(handshakes()) + board.refused["handshakes-per-source"] == 400, WAIT)
        assert handshakes() == [board.limits.handshakes_per_source] * 3
    assert board.refused["handshakes-per-source"] == 400 - 3 * board.limits.handshakes_per_source
    assert member_relays(board, ssh, listener, b"still here\n") < WAIT
    warnings = [r.getMessage() for r in caplog.records if "handshakes-per-source" in r.getMessage()]
    assert len(warnings) == 1  # rate-limited: one line a minute, with the count, not one per socket


def test_handshakes_without_login_are_closed_at_the_deadline(
        make_board: Callable[..., BoardServer], channel: Callable[..., paramiko.Channel],
        ssh: Callable[..., subprocess.CompletedProcess[bytes]], sockets: list[socket.socket]) -> None:
    """Strangers finish the SSH key exchange, never log in, and are hung up at auth_timeout."""
    limits = Limits(max_connections=64, handshake_timeout=2.0, auth_timeout=3.0)
    board = make_board(limits=limits)
    listener = Lines(channel(board, "alice", "sub -k t").makefile("rb"))
    wait_clients(board, "alice/t", sub=1)
    transports: list[paramiko.Transport] = []
    started = time.monotonic()
    try:
        for i in range(2 * limits.unauthenticated_per_source):
            source = f"127.0.0.{2 + i % 2}"
            try:
                transport = paramiko.Transport(open_from(board, source, sockets))
                transports.append(transport)
                transport.start_client(timeout=WAIT)
            except (paramiko.SSHException, EOFError, OSError):
                continue  # refused: this source has its share already
        shook = [t for t in transports if t.is_active()]
        assert 0 < len(shook) <= 2 * limits.unauthenticated_per_source
        with board._cond:  # noqa: SLF001
            counts = board._admission.counts()  # noqa: SLF001
        assert counts["unauthenticated"] <= limits.unauthenticated_cap
        assert member_relays(board, ssh, listener, b"during\n") < WAIT  # members log in meanwhile
        for transport in shook:
            transport.join(limits.auth_timeout + WAIT)  # its reader thread ends when the board hangs up
            assert not transport.is_active()
        assert time.monotonic() - started >= limits.auth_timeout
        assert board.refused["auth-timeout"] == len(shook)
        assert member_relays(board, ssh, listener, b"after\n") < WAIT
    finally:
        for transport in transports:
            with contextlib.suppress(Exception):
                transport.close()


def test_logged_in_members_keep_their_reserve(
        make_board: Callable[..., BoardServer], channel: Callable[..., paramiko.Channel],
        sockets: list[socket.socket]) -> None:
    """Strangers from several sources fill the unauthenticated share; the rest stays for members."""
    board = make_board(limits=Limits(max_connections=8, max_unauthenticated=4))
    listeners = [channel(board, "alice", "sub -k t") for _ in range(3)]
    wait_clients(board, "alice/t", sub=3)
    for i in range(4):
        open_from(board, f"127.0.0.{2 + i}", sockets)
    with board._cond:  # noqa: SLF001
        assert board._cond.wait_for(lambda: board._admission.counts() == {  # noqa: SLF001
            "total": 7, "unauthenticated": 4, "handshakes": 4}, WAIT)
    extra = open_from(board, "127.0.0.9", sockets)
    try:
        greeting = extra.recv(100)
    except ConnectionResetError:
        greeting = b""
    assert greeting == b""  # turned away before the SSH banner: the strangers' share is full
    assert board.refused["max-unauthenticated"] == 1
    pub = listeners[0].get_transport().open_session(timeout=WAIT)  # type: ignore[union-attr]
    pub.exec_command("pub -b=false t")  # logged-in members carry on
    pub.sendall(b"hi\n")
    pub.shutdown_write()
    assert pub.recv_exit_status() == 0


def test_a_member_shed_by_a_busy_board_joins_on_a_later_try(
        make_board: Callable[..., BoardServer], keydir: Path, sockets: list[socket.socket],
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """A board full of strangers' handshakes closes a member's connection; the member's client tries again."""
    caplog.set_level(logging.INFO, logger="p2pexec.board")
    board = make_board(limits=Limits(max_connections=8, max_unauthenticated=1, handshake_timeout=1.0,
                                     auth_timeout=2.0))
    open_from(board, "127.0.0.2", sockets)  # the only unauthenticated place, until its handshake deadline
    alice = load_identity("alice", keydir / "alice")
    session = BoardSession(
        BoardAddress("127.0.0.1", board.port, "alice"), alice, "alice/t",
        inbox=messages.Inbox("alice/t", board.users), on_message=lambda m: None,
        make_hello=lambda: messages.encode(alice, "alice/t", "hello", {"role": "observer"}, now=time.time(),
                                           ttl=30),
        known_hosts=tmp_path / "known_hosts", accept_new_host_key=True)
    session.open(within=WAIT)
    try:
        assert session.connected.is_set()
    finally:
        session.close()
    assert board.refused["max-unauthenticated"] >= 1, board.refused
    assert "is busy" in caplog.text


def test_a_board_that_is_not_running_fails_at_once(tmp_path: Path, keydir: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: connections are refused
        alice = load_identity("alice", keydir / "alice")
        session = BoardSession(
            BoardAddress("127.0.0.1", port, "alice"), alice, "alice/t",
            inbox=messages.Inbox("alice/t", Keyring.parse("")), on_message=lambda m: None,
            make_hello=lambda: b"", known_hosts=tmp_path / "known_hosts")
        started = time.monotonic()
        with pytest.raises(BoardConnectionError) as caught:
            session.open(within=WAIT)
    assert not isinstance(caught.value, BoardBusyError)
    assert time.monotonic() - started < WAIT  # no retries: nothing listens there

