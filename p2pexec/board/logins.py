"""Who each connection logged in as, and whether its key still opens the board.

A key opens the board if the users file lists it for its user, or if an
invitation (:class:`.Registry`) registered it; a key offered for a name with an
open invitation logs in too, but may only run ``join``.  The users file can be
replaced while connections are open: :meth:`Logins.still_allowed` answers
against the current one.  Pure: the hub (:mod:`.hub`) calls it under the
server's lock.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from .registry import Registry

C = TypeVar("C", bound=Hashable)  # how the server names a connection


class Users(Protocol):
    """The board's users file, as the hub needs it (:class:`..keys.Keyring`)."""

    def allows(self, user: str, key: bytes) -> bool: ...


@dataclass
class Login:
    """Who a connection logged in as; ``joining``: on an invitation, so it may only run ``join``."""

    user: str
    key: bytes
    joining: bool
    revoked: bool = False  # its key is no longer its user's: being hung up


class Logins(Generic[C]):
    """The users file, the registry's keys, and the login of each open connection."""

    def __init__(self, users: Users, registry: Registry) -> None:
        self.users = users
        self.registry = registry
        self._by_conn: dict[C, Login] = {}

    def knows(self, user: str, key: bytes) -> bool:
        """In the users file, or joined through an invitation."""
        return self.users.allows(user, key) or self.registry.allows(user, key)

    def log_in(self, conn: C, user: str, key: bytes, wall: float) -> bool:
        """``conn`` offers ``key`` for ``user`` at ``wall`` (seconds since the epoch): may it log in?

        A known key logs in; so does any key for a name with an open invitation,
        which may then run ``join`` and nothing else.  The last successful
        call for ``conn`` is its login (paramiko asks before it checks the signature).
        """
        known = self.knows(user, key)
        if not (known or self.registry.invited(user, wall)):
            return False
        self._by_conn[conn] = Login(user, key, joining=not known)
        return True

    def get(self, conn: C) -> Login | None:
        return self._by_conn.get(conn)

    def log_out(self, conn: C) -> None:
        """``conn`` is closed (its sessions are being ended)."""
        self._by_conn.pop(conn, None)

    def connections(self) -> list[C]:
        """Every connection logged in, in the order they first did."""
        return list(self._by_conn)

    def live(self, conn: C) -> bool:
        """Logged in and not revoked: its sessions may still send and receive."""
        login = self._by_conn.get(conn)
        return login is not None and not login.revoked

    def still_allowed(self, conn: C, wall: float) -> bool:
        """Whether ``conn``'s key still opens the board (the users may have changed since it logged in)."""
        login = self._by_conn.get(conn)
        if login is None or login.revoked:
            return False
        return self.knows(login.user, login.key) or (login.joining and self.registry.invited(login.user, wall))

    def revoke(self, conn: C) -> bool:
        """Mark ``conn`` revoked: its sessions get nothing more.  True the first time."""
        login = self._by_conn.get(conn)
        if login is None or login.revoked:
            return False
        login.revoked = True
        return True
