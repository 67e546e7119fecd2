"""Resolving who we are, which board, and who the members are: one way for clients and workers."""

from __future__ import annotations

import getpass
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko

from .board.address import BoardAddress
from .board.client import DEFAULT_BOARD
from .errors import ConfigurationError
from .files import write_json_atomically
from .keys import Identity, Keyring, Members, WatchedKeyring, agent_identity, load_identity, parse_openssh_public
from .membership import Membership

log = logging.getLogger(__name__)


def validate_cluster(cluster: str) -> str:
    if not isinstance(cluster, str):  # P2PExecutor(4), as one writes ProcessPoolExecutor(4)
        raise TypeError(f"the cluster is a name like 'alice/friends', not {cluster!r} (to cap the slots used, "
                        f"as ProcessPoolExecutor({cluster!r}) would: max_workers={cluster!r})")
    owner, sep, name = cluster.partition("/")
    if not sep or not owner or not name or "/" in name or any(c.isspace() for c in cluster):
        raise ConfigurationError(f"cluster {cluster!r} must be written 'owner/name', e.g. 'alice/friends'")
    return cluster


def physical_memory() -> int | None:
    """This machine's memory in bytes, where the platform says."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # AttributeError: Windows has no sysconf
        return None


def config_dir() -> Path:
    return Path(os.environ.get("P2PEXEC_CONFIG", "~/.config/p2pexec")).expanduser()


def default_members_path(cluster: str) -> Path:
    """A hand-kept members file ('NAME ssh-ed25519 KEY' per line), for those who keep one."""
    owner, _, name = cluster.partition("/")
    return config_dir() / "clusters" / owner / f"{name}.members"


def cluster_state_path(cluster: str) -> Path:
    """What ``p2pexec join`` / ``invite`` saved: board, user, key, the owner's key and signed list."""
    owner, _, name = cluster.partition("/")
    return config_dir() / "clusters" / owner / f"{name}.json"


def saved_clusters() -> list[str]:
    """The clusters joined or created on this machine (``join`` and ``invite`` save them)."""
    return sorted(f"{path.parent.name}/{path.stem}" for path in (config_dir() / "clusters").glob("*/*.json"))


def load_cluster_state(cluster: str) -> dict[str, Any] | None:
    path = cluster_state_path(cluster)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}; run p2pexec join again") from None
    if not isinstance(state, dict) or not isinstance(state.get("owner_key"), str):
        raise ConfigurationError(f"{path} is not a cluster file; run p2pexec join again")
    return state


def save_cluster_state(cluster: str, state: dict[str, Any]) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    write_json_atomically(cluster_state_path(cluster), state)  # (a worker and a client may both save)


def membership_of(cluster: str, state: dict[str, Any]) -> Membership:
    """The live member list kept in ``state``; every change is saved back to the cluster file."""
    kind, _, b64 = state["owner_key"].partition(" ")
    try:
        owner_key = parse_openssh_public(kind, b64.split(" ")[0])
    except ValueError as exc:
        raise ConfigurationError(f"{cluster_state_path(cluster)}: bad owner key: {exc}") from None
    membership = Membership(cluster, owner_key)
    if isinstance(state.get("list"), str):
        membership.update(state["list"])
    membership.add_joins(state.get("joins"))

    def save(m: Membership) -> None:
        state.update(list=m.list.to_json() if m.list else None, joins=m.joins_json())
        try:
            save_cluster_state(cluster, state)
        except OSError as exc:
            log.warning("could not save the member list of %s: %s", cluster, exc)

    membership.on_change = save
    return membership


@dataclass(frozen=True)
class Participant:
    """Everything needed to join a cluster's board as one user."""

    cluster: str
    board: BoardAddress
    identity: Identity
    keyring: Members
    board_given: bool
    relays: tuple[str, ...] = ()  # relay multiaddrs from relay= / --relay / $P2PEXEC_RELAY

    @property
    def board_hint(self) -> str:
        """The ``--board`` flag a friend needs, when the board is not the default."""
        return f" --board {BoardAddress(self.board.host, self.board.port)}" if self.board_given else ""  # their name


def resolve(cluster: str, *, board: str | None = None, user: str | None = None,
            identity: str | os.PathLike[str] | None = None,
            members: str | os.PathLike[str] | None = None, members_required: bool = True,
            relay: str | Sequence[str] | None = None) -> Participant:
    """Apply the defaults and load keys.

    Board: ``board``, ``$P2PEXEC_BOARD``, the one ``p2pexec join`` saved for
    the cluster, else pico.sh; a Host alias of ``~/.ssh/config`` supplies
    host name, port, user and identity file.
    Key: ``identity``, ``$P2PEXEC_IDENTITY``, the Host alias's, the one ``p2pexec join`` saved, the
    ssh-agent's key listed for the user in the members file, else ``~/.ssh/id_ed25519``.
    Relays: ``relay`` (one multiaddr or several), else ``$P2PEXEC_RELAY``
    (comma-separated); the board may name its own besides.
    """
    cluster = validate_cluster(cluster)
    members_path = Path(members).expanduser() if members is not None else default_members_path(cluster)
    state = load_cluster_state(cluster) if members is None and not members_path.exists() else None
    board_url = board or os.environ.get("P2PEXEC_BOARD")
    address, config_identity = apply_ssh_config(
        BoardAddress.parse(board_url or (state or {}).get("board") or DEFAULT_BOARD))
    username = user or address.user or os.environ.get("P2PEXEC_USER") or (state or {}).get("user") \
        or getpass.getuser()
    keyring: Members | None
    if members is not None or members_path.exists():
        keyring = WatchedKeyring(members_path)  # read again when it changes: removals take effect at once
    elif state is not None:
        keyring = membership_of(cluster, state)
    elif not members_required:
        keyring = None
    elif username == cluster.partition("/")[0]:
        raise ConfigurationError(
            f"cluster {cluster} has no members yet: invite one with 'p2pexec invite {cluster} FRIEND' "
            f"(which creates it), or pass members=PATH (--members) for a hand-kept members file")
    else:
        joined = saved_clusters()
        raise ConfigurationError(
            f"you have not joined cluster {cluster}"
            + (f" (you joined: {', '.join(joined)})" if joined else "")
            + f": run 'p2pexec join CODE' with the code its owner ({cluster.partition('/')[0]}) gets from "
            f"'p2pexec invite {cluster} YOURNAME', or pass members=PATH (--members) for a hand-kept members file")
    key_file = identity or os.environ.get("P2PEXEC_IDENTITY") or config_identity or (state or {}).get("identity")
    ident = None if key_file or keyring is None else agent_identity(username, keyring)
    if ident is None:
        default = Path("~/.ssh/id_ed25519").expanduser()
        if not key_file and not default.exists():
            raise ConfigurationError(
                f"no SSH key for user {username!r}: pass identity=PATH (--identity), load your key into "
                f"ssh-agent, or create ~/.ssh/id_ed25519 with: ssh-keygen -t ed25519"
            )
        ident = load_identity(username, Path(key_file or default))
    if keyring is not None and not keyring.allows(username, ident.public_key):
        where = f"the members file {members_path}" if state is None else f"the member list of {cluster}"
        raise ConfigurationError(
            f"{where} does not list user {username!r} with the key {ident.where}; ask the owner of "
            f"{cluster} for an invitation (p2pexec invite {cluster} {username}), or to add: "
            f"{username} {ident.openssh_public}"
        )
    return Participant(cluster, address, ident, keyring if keyring is not None else Keyring(), board_url is not None,
                       _relays(relay))


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
