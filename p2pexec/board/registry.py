"""What a ``p2pexec board`` keeps beyond its users file: invitations, the keys of friends who joined
through one, and each cluster's signed member list.

Pure: no files, sockets, threads or clock (callers pass ``now``, seconds
since the epoch: invitations expire by the calendar).  The board's hub
calls it and turns :class:`CommandError` into the command's error output;
the SSH server loads and saves :meth:`Registry.snapshot` as one JSON file,
written atomically (:mod:`.statefile`).
"""

from __future__ import annotations

import base64
import copy
import json
import logging
from typing import Any

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

    SECTIONS = ("invites", "lists", "joins")

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        """From a :meth:`snapshot` (as read back from its file); ValueError if it is not one."""
        if state is None:
            state = {k: {} for k in self.SECTIONS}
        if not isinstance(state, dict) or not all(isinstance(state.get(k), dict) for k in self.SECTIONS):
            raise ValueError("expected an object with invites, lists and joins")
        self._state: dict[str, dict[str, Any]] = {k: copy.deepcopy(state[k]) for k in self.SECTIONS}

    def snapshot(self) -> dict[str, Any]:
        """The whole state, to save: a deep copy, so saving needs no lock."""
        return copy.deepcopy(self._state)

    # -- who may log in, and where
    def allows(self, user: str, key: bytes) -> bool:
        """A friend who joined some cluster through an invitation, with the key they joined with."""
        return any(self.allows_in(cluster, user, key) for cluster in self._state["joins"])

    def allows_in(self, cluster: str, user: str, key: bytes) -> bool:
        """That key joined ``cluster``, and its list still names ``user`` (removal prunes the join)."""
        return b64(key) in self._state["joins"].get(cluster, {}).get(user, {})

    def invited(self, user: str, now: float) -> bool:
        """Whether ``user`` holds an unused, unexpired invitation to some cluster."""
        return any(user in invites and invites[user]["exp"] > now for invites in self._state["invites"].values())

    # -- commands
    def invite(self, cluster: str, user: str, key_b64: str, now: float) -> None:
        """Let ``user`` join ``cluster`` once, proving it with the invitation key's private half."""
        _raw(key_b64, 32, "the invitation key")
        self._state["invites"].setdefault(cluster, {})[user] = {"key": key_b64,
                                                                 "exp": now + INVITE_DAYS * 86400}

    def join(self, cluster: str, user: str, key: bytes, endorsement_b64: str, now: float) -> None:
        """Register ``key`` (the one ``user`` logged in with) if the invitation vouches for it."""
        invite = self._state["invites"].get(cluster, {}).get(user)
        signature = _raw(endorsement_b64, 64, "the endorsement")
        if invite is None or invite["exp"] <= now:
            raise CommandError(f"no open invitation for {user} to {cluster}: ask its owner for a new one "
                               f"(p2pexec invite {cluster} {user})")
        if not endorsed(base64.b64decode(invite["key"]), cluster, user, key, signature):
            raise CommandError("this invitation code does not match: ask the owner for a new one")
        del self._state["invites"][cluster][user]
        self._state["joins"].setdefault(cluster, {}).setdefault(user, {})[b64(key)] = endorsement_b64
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
        return membership.list

    def view(self, cluster: str) -> str:
        """The ``members`` answer: the signed list and the endorsed keys of those who joined."""
        return json.dumps({"list": self._state["lists"].get(cluster),
                           "joins": self._state["joins"].get(cluster, {})}) + "\n"
