"""What a ``p2pexec board`` keeps beyond its users file: invitations, the keys of friends who joined
through one, and each cluster's signed member list.

No sockets or threads: the SSH server calls it under its own lock and
turns :class:`CommandError` into the command's error output.  State
persists in one JSON file, written atomically.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from ..files import write_json_atomically
from ..membership import INVITE, MemberList, Membership, endorsed
from ..protocol.messages import b64, unb64
from .commands import CommandError

log = logging.getLogger(__name__)

INVITE_DAYS = 7


def _raw(text: str, length: int, what: str) -> bytes:
    try:
        return unb64(text, length)
    except ValueError:
        raise CommandError(f"{what} must be {length} bytes of base64") from None


class Registry:
    """Invitations (one use each, :data:`INVITE_DAYS` days), joined keys per cluster, signed member lists.

    A key registered through an invitation serves only the clusters it joined, and only while their
    lists name its user: an invitation to one's own cluster cannot borrow a name elsewhere.
    """

    def __init__(self, path: Path, now: Callable[[], float] = time.time) -> None:
        self.path = path
        self._now = now
        self._state: dict[str, dict[str, Any]] = {"invites": {}, "lists": {}, "joins": {}}
        try:
            loaded = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"cannot read board state {path}: {exc}") from None
        if not isinstance(loaded, dict) or not all(isinstance(loaded.get(k), dict) for k in self._state):
            raise ConfigurationError(f"board state {path} is malformed")
        self._state = {k: loaded[k] for k in self._state}

    # -- who may log in, and where
    def allows(self, user: str, key: bytes) -> bool:
        """A friend who joined some cluster through an invitation, with the key they joined with."""
        return any(self.allows_in(cluster, user, key) for cluster in self._state["joins"])

    def allows_in(self, cluster: str, user: str, key: bytes) -> bool:
        """That key joined ``cluster``, and its list still names ``user`` (removal prunes the join)."""
        return b64(key) in self._state["joins"].get(cluster, {}).get(user, {})

    def invited(self, user: str) -> bool:
        """Whether ``user`` holds an unused, unexpired invitation to some cluster."""
        now = self._now()
        return any(user in invites and invites[user]["exp"] > now for invites in self._state["invites"].values())

    # -- commands
    def invite(self, cluster: str, user: str, key_b64: str) -> None:
        """Let ``user`` join ``cluster`` once, proving it with the invitation key's private half."""
        _raw(key_b64, 32, "the invitation key")
        self._state["invites"].setdefault(cluster, {})[user] = {"key": key_b64,
                                                                 "exp": self._now() + INVITE_DAYS * 86400}
        self._save()

    def join(self, cluster: str, user: str, key: bytes, endorsement_b64: str) -> None:
        """Register ``key`` (the one ``user`` logged in with) if the invitation vouches for it."""
        invite = self._state["invites"].get(cluster, {}).get(user)
        signature = _raw(endorsement_b64, 64, "the endorsement")
        if invite is None or invite["exp"] <= self._now():
            raise CommandError(f"no open invitation for {user} to {cluster}: ask its owner for a new one "
                               f"(p2pexec invite {cluster} {user})")
        if not endorsed(base64.b64decode(invite["key"]), cluster, user, key, signature):
            raise CommandError("this invitation code does not match: ask the owner for a new one")
        del self._state["invites"][cluster][user]
        self._state["joins"].setdefault(cluster, {}).setdefault(user, {})[b64(key)] = endorsement_b64
        self._save()
        log.info("%s joined %s", user, cluster)

    def set_list(self, cluster: str, owner_key: bytes, text: str) -> MemberList:
        """Keep the owner's newer signed list; returns it (its names become the access list)."""
        membership = Membership(cluster, owner_key)
        old = self._state["lists"].get(cluster)
        if old is not None:
            membership.update(old)
        if not membership.update(text):
            raise CommandError("not a newer member list signed by this cluster's owner with the key you "
                               "logged in with")
        assert membership.list is not None
        self._state["lists"][cluster] = text
        joins = self._state["joins"].get(cluster, {})
        self._state["joins"][cluster] = {u: ks for u, ks in joins.items() if u in membership.list.members}
        invites = self._state["invites"].get(cluster, {})
        self._state["invites"][cluster] = {u: i for u, i in invites.items() if any(
            e.kind == INVITE and b64(e.key) == i["key"] for e in membership.list.members.get(u, ()))}
        self._save()
        return membership.list

    def view(self, cluster: str) -> str:
        """The ``members`` answer: the signed list and the endorsed keys of those who joined."""
        return json.dumps({"list": self._state["lists"].get(cluster),
                           "joins": self._state["joins"].get(cluster, {})}) + "\n"

    def _save(self) -> None:
        write_json_atomically(self.path, self._state)
