"""Who may join which topic: the access lists, and the membership commands (``invite``, ``join``,
``members``) that change who is in a cluster.

An access list names who besides its owner may join ``owner/name``; a topic
without one is its owner's alone, and ``public/…`` topics are everyone's.
Names decide, as on pico.sh; a key that only an invitation registered (see
:mod:`.registry`) serves only the clusters it joined.  A signed member list set
with ``members LIST`` becomes the cluster's access list.  Ending the sessions
of users no longer listed is the hub's (:meth:`.Hub.set_members`).  Pure.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..keys import valid_username
from .actions import Refused
from .commands import PUBLIC, Command, CommandError, valid_topic
from .logins import Login, Logins
from .registry import INVITE_DAYS


class AccessLists:
    """Every cluster's access list, checked against the keys :class:`.Logins` knows."""

    def __init__(self, logins: Logins[Any], members: Mapping[str, tuple[str, ...]] | None = None) -> None:
        self._logins = logins  # the users file and the registry, as they are now
        self._members: dict[str, tuple[str, ...]] = dict(members or {})

    @property
    def lists(self) -> Mapping[str, tuple[str, ...]]:
        """Every access list by cluster (a view)."""
        return self._members

    def allowed(self, user: str, topic: str, key: bytes | None = None) -> bool:
        """By name, as pico does; and a key that only an invitation registered serves only its own clusters."""
        owner = topic.split("/", 1)[0]
        if owner == PUBLIC:
            return True
        if not (user == owner or user in self._members.get(topic, ())):
            return False
        if key is None or self._logins.users.allows(user, key):
            return True
        return self._logins.registry.allows_in(topic, user, key)

    def get(self, cluster: str) -> tuple[str, ...] | None:
        """The access list of ``cluster``, or None if its owner never set one."""
        return self._members.get(cluster)

    def snapshot(self) -> dict[str, list[str]]:
        """Every access list, to save."""
        return {k: list(v) for k, v in sorted(self._members.items())}

    def set(self, cluster: str, members: Iterable[str]) -> bool:
        """Set who besides its owner may join ``cluster``; False if that is the list already.

        ValueError if ``cluster`` is not ``owner/name`` (and not public) or a name is not valid.
        """
        members = list(members)
        if not valid_topic(cluster) or cluster.startswith(PUBLIC + "/"):
            raise ValueError(f"invalid cluster {cluster!r}: expected OWNER/NAME, not public")
        bad = [m for m in members if not valid_username(m)]
        if bad:
            raise ValueError(f"invalid user names {bad}")
        new = tuple(dict.fromkeys(members))
        if self._members.get(cluster) == new:
            return False
        self._members[cluster] = new
        return True

    def membership(self, login: Login, cmd: Command, wall: float,
                   room: Callable[[str], None]) -> tuple[str, bool, list[str] | None]:
        """Run ``invite``, ``join`` or ``members`` for ``login`` at ``wall`` (see :mod:`.registry`).

        Returns the output, whether the registry changed (to be saved), and the cluster's new access list
        if a member list was set.  ``room(cluster)`` raises :class:`.Refused` if its owner has no room
        for another topic.  Raises CommandError, whose text is for the client's stderr.
        """
        registry = self._logins.registry
        cluster, owner, user, key = cmd.topic, cmd.owner, login.user, login.key
        assert cluster is not None
        if cmd.name == "join":
            registry.join(cluster, user, key, cmd.args[0], wall)
            login.joining = False
            return registry.view(cluster), True, None
        if cmd.name == "invite" or cmd.args:
            if user != owner or not self._logins.users.allows(user, key):  # a users-file key, not an invitation's
                raise CommandError(f"only {owner}, with a key in this board's users file, may change who is "
                                   f"in {cluster}")
        elif not self.allowed(user, cluster, key):
            raise CommandError(f"access denied to {cluster}")
        if cmd.name == "invite":
            invitee, invitation_key = cmd.args
            if not valid_username(invitee):
                raise CommandError(f"invalid user name {invitee!r}")
            registry.invite(cluster, invitee, invitation_key, wall)
            return f"{invitee} may join {cluster} once within {INVITE_DAYS} days\n", True, None
        if cmd.args:
            try:
                text = base64.b64decode(cmd.args[0], validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                raise CommandError("the member list must be base64 of its JSON") from None
            try:
                room(cluster)
            except Refused as exc:
                raise CommandError(str(exc)) from None
            signed = registry.set_list(cluster, key, text)
            return f"member list of {cluster} is version {signed.version}\n", True, sorted(signed.members)
        return registry.view(cluster), False, None
