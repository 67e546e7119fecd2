"""Resolving who we are, which board, and who the members are: one way for clients and workers."""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from pathlib import Path

from .board.client import DEFAULT_BOARD, BoardAddress
from .errors import ConfigurationError
from .keys import Identity, Keyring, load_identity


def validate_cluster(cluster: str) -> str:
    owner, sep, name = cluster.partition("/")
    if not sep or not owner or not name or "/" in name or any(c.isspace() for c in cluster):
        raise ConfigurationError(f"cluster {cluster!r} must be written 'owner/name', e.g. 'alice/friends'")
    return cluster


def default_members_path(cluster: str) -> Path:
    owner, _, name = cluster.partition("/")
    base = Path(os.environ.get("P2PEXEC_CONFIG", "~/.config/p2pexec")).expanduser()
    return base / "clusters" / owner / f"{name}.members"


@dataclass(frozen=True)
class Participant:
    """Everything needed to join a cluster's board as one user."""

    cluster: str
    board: BoardAddress
    identity: Identity
    key_path: Path
    keyring: Keyring
    board_given: bool

    @property
    def board_hint(self) -> str:
        """The ``--board`` flag a friend needs, when the board is not the default."""
        return f" --board {self.board}" if self.board_given else ""


def resolve(cluster: str, *, board: str | None = None, user: str | None = None,
            identity: str | os.PathLike[str] | None = None,
            members: str | os.PathLike[str] | None = None) -> Participant:
    """Apply the defaults ($P2PEXEC_BOARD, $P2PEXEC_USER, $P2PEXEC_IDENTITY, ...) and load keys."""
    cluster = validate_cluster(cluster)
    board_url = board or os.environ.get("P2PEXEC_BOARD")
    address = BoardAddress.parse(board_url or DEFAULT_BOARD)
    username = user or address.user or os.environ.get("P2PEXEC_USER") or getpass.getuser()
    key_path = Path(identity or os.environ.get("P2PEXEC_IDENTITY") or "~/.ssh/id_ed25519").expanduser()
    ident = load_identity(username, key_path)
    members_path = Path(members).expanduser() if members is not None else default_members_path(cluster)
    if members is None and not members_path.exists():
        raise ConfigurationError(
            f"no members file for cluster {cluster} at {members_path}. It lists who may take part "
            f"('NAME ssh-ed25519 KEY' per line); ask the cluster's owner for it, or pass members=PATH "
            f"(--members)"
        )
    keyring = Keyring.load(members_path)
    if not keyring.allows(username, ident.public_key):
        raise ConfigurationError(
            f"the members file {members_path} does not list user {username!r} with the key "
            f"{key_path}; ask the owner of {cluster} to add: {username} {ident.openssh_public}"
        )
    return Participant(cluster, address, ident, key_path, keyring, board_url is not None)
