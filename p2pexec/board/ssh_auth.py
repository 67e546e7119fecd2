"""The SSH side of who may do what: the board's host key, and the questions paramiko asks of each
connection (which key logs in as whom, which channels open, which commands start) put to the board.

Only Ed25519 user keys exist for the board (its users file, invitations); the
answers themselves are the hub's (:mod:`.hub`), asked through the server
under its lock.
"""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path
from typing import Protocol

import paramiko

from ..keys import ED25519, generate_identity_file, parse_openssh_public
from .listener import Connection

log = logging.getLogger("p2pexec.board")


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


class Gate(Protocol):
    """What the interface asks of the board (:class:`.server.BoardServer`)."""

    def _log_in(self, conn: Connection, user: str, key: bytes) -> bool: ...
    def _may_open_channel(self, conn: Connection) -> bool: ...
    def _queue_session(self, conn: Connection, channel: paramiko.Channel, command: bytes | None) -> bool: ...


class Interface(paramiko.ServerInterface):
    """Public-key authentication against the keyring; session channels only."""

    def __init__(self, board: Gate, conn: Connection) -> None:
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
