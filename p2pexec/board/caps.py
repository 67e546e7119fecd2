"""How much of the board one user may take: lines a second per session, running commands, topics.

Each cap is a small piece of arithmetic the hub (:mod:`.hub`) consults and
counts when it says no (``refused``, ``dropped``): a token :class:`Bucket` per
session for ``lines_per_second``, and :class:`Caps` for ``sessions_per_user``
(across all of a user's connections) and ``topics_per_user``.  Pure.
"""

from __future__ import annotations

import collections
from collections.abc import Collection, Hashable
from typing import Generic, TypeVar

from .commands import PUBLIC

K = TypeVar("K", bound=Hashable)  # how the server names a running command (its channel)


class Bucket:
    """A token bucket: ``rate`` lines a second on average, bursts of ``max(10, 2 * rate)``."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.burst = self.tokens = max(10.0, 2 * rate)
        self.last = now

    def take(self, now: float) -> bool:
        """Spend a token on one line at ``now`` (monotonic seconds); False if there is none left."""
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.last) * self.rate)
        self.last = max(self.last, now)
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class Caps(Generic[K]):
    """Each user's running commands (at most ``sessions_per_user``) and the room for its topics."""

    def __init__(self, sessions_per_user: int, topics_per_user: int) -> None:
        self.sessions_per_user, self.topics_per_user = sessions_per_user, topics_per_user
        self._slots: dict[K, str] = {}  # running commands -> their user
        self._user_slots: collections.Counter[str] = collections.Counter()

    def open(self, command: K, user: str) -> bool:
        """Count a running command against ``user``; False (nothing counted) if that is over the cap."""
        if self._user_slots[user] >= self.sessions_per_user:
            return False
        self._user_slots[user] += 1
        self._slots[command] = user
        return True

    def close(self, command: K) -> None:
        """Undo :meth:`open` (idempotent)."""
        user = self._slots.pop(command, None)
        if user is not None:
            self._user_slots[user] -= 1
            if not self._user_slots[user]:
                del self._user_slots[user]

    def room(self, name: str, live: Collection[str], listed: Collection[str]) -> str | None:
        """Why topic ``name`` may not be added to the ``live`` topics and those with an access list
        (``listed``), or None if its owner has room for it."""
        owner = name.split("/", 1)[0]
        if owner == PUBLIC or name in live or name in listed:
            return None  # public topics live only as long as their sessions, which sessions_per_user bounds
        owned = {n for n in (*live, *listed) if n.split("/", 1)[0] == owner}
        if len(owned) >= self.topics_per_user:
            return (f"{owner} has {len(owned)} topics on this board, the most it keeps for one user "
                    f"(topics_per_user); use one of them (see: ls)")
        return None
