"""Resolving who we are, which board, and who the members are: one way for clients and workers."""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path

from .board.client import DEFAULT_BOARD, BoardAddress
from .errors import ConfigurationError
import paramiko

from .keys import Identity, Keyring, agent_identity, load_identity


def validate_cluster(cluster: str) -> str:
    owner, sep, name = cluster.partition("/")
    if not sep or not owner or not name or "/" in name or any(c.isspace() for c in cluster):
        raise ConfigurationError(f"cluster {cluster!r} must be written 'owner/name', e.g. 'alice/friends'")
    return cluster


def physical_memory() -> int | None:
    """This machine's memory in bytes, where the platform says."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


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
    keyring: Keyring
    board_given: bool
    relays: tuple[str, ...] = ()  # relay multiaddrs from relay= / --relay / $P2PEXEC_RELAY

    @property
    def board_hint(self) -> str:
        """The ``--board`` flag a friend needs, when the board is not the default."""
        return f" --board {self.board}" if self.board_given else ""


def resolve(cluster: str, *, board: str | None = None, user: str | None = None,
            identity: str | os.PathLike[str] | None = None,
            members: str | os.PathLike[str] | None = None, members_required: bool = True,
            relay: str | Sequence[str] | None = None) -> Participant:
    """Apply the defaults and load keys.

    Board: ``board``, ``$P2PEXEC_BOARD``, else pico.sh; a Host alias of
    ``~/.ssh/config`` supplies host name, port, user and identity file.
    Key: ``identity``, ``$P2PEXEC_IDENTITY``, the ssh-agent's key listed for
    the user in the members file, else ``~/.ssh/id_ed25519``.
    Relays: ``relay`` (one multiaddr or several), else ``$P2PEXEC_RELAY``
    (comma-separated); the board may name its own besides.
    """
    cluster = validate_cluster(cluster)
    board_url = board or os.environ.get("P2PEXEC_BOARD")
    address, config_identity = apply_ssh_config(BoardAddress.parse(board_url or DEFAULT_BOARD))
    username = user or address.user or os.environ.get("P2PEXEC_USER") or getpass.getuser()
    members_path = Path(members).expanduser() if members is not None else default_members_path(cluster)
    if not members_required and members is None and not members_path.exists():
        members_path = None
    elif members is None and not members_path.exists():
        raise ConfigurationError(
            f"no members file for cluster {cluster} at {members_path}. It lists who may take part "
            f"('NAME ssh-ed25519 KEY' per line); ask the cluster's owner for it, or pass members=PATH "
            f"(--members)"
        )
    keyring = Keyring.load(members_path) if members_path else Keyring()
    key_file = identity or os.environ.get("P2PEXEC_IDENTITY") or config_identity
    ident = None if key_file else agent_identity(username, keyring)
    if ident is None:
        default = Path("~/.ssh/id_ed25519").expanduser()
        if not key_file and not default.exists():
            raise ConfigurationError(
                f"no SSH key for user {username!r}: pass identity=PATH (--identity), load your key into "
                f"ssh-agent, or create ~/.ssh/id_ed25519 with: ssh-keygen -t ed25519"
            )
        ident = load_identity(username, Path(key_file or default))
    if members_path and not keyring.allows(username, ident.public_key):
        raise ConfigurationError(
            f"the members file {members_path} does not list user {username!r} with the key "
            f"{ident.where}; ask the owner of {cluster} to add: {username} {ident.openssh_public}"
        )
    return Participant(cluster, address, ident, keyring, board_url is not None, _relays(relay))


def _relays(relay: str | Sequence[str] | None) -> tuple[str, ...]:
    given = relay if relay is not None else os.environ.get("P2PEXEC_RELAY", "")
    items = given.split(",") if isinstance(given, str) else list(given)
    relays = tuple(r.strip() for r in items if r.strip())
    bad = [r for r in relays if not r.startswith(("/ip4/", "/ip6/", "/dns")) or "/p2p/" not in r]
    if bad:
        raise ConfigurationError(f"relay address {bad[0]!r} must be a multiaddr like "
                                 f"/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW... (p2pexec relay prints it)")
    return relays


def apply_ssh_config(address: BoardAddress, path: Path = Path("~/.ssh/config")) -> tuple[BoardAddress, str | None]:
    """Resolve a Host alias as OpenSSH would; returns the address and any IdentityFile."""
    path = path.expanduser()
    if not path.exists():
        return address, None
    try:
        entry = paramiko.SSHConfig.from_path(str(path)).lookup(address.host)
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}") from None
    port = address.port if address.port != 22 else int(entry.get("port", 22))
    resolved = BoardAddress(host=entry.get("hostname", address.host), port=port,
                            user=address.user or entry.get("user"))
    files = entry.get("identityfile") or []
    return resolved, files[0] if files else None
