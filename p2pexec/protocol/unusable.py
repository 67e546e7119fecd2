"""Workers that are online but that a client cannot use, and why: pure bookkeeping for the no-worker warning.

A client waiting for workers should not just say "no worker has offered"
when a friend's worker is right there with another Python, refuses this
member, or was excluded, banned or unreachable.  Workers tell a client
they will not serve it with a ``decline`` (rate-limited by
:class:`DeclineLimiter`); the client notes that, and what it sees itself
(hellos, offers it ignored), in :class:`Unusable`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .matching import REVISION

REMEMBER_SECONDS = 90.0  # a worker not seen again for this long has probably left
DECLINE_EVERY = 30.0  # a worker declines one request at most this often
MAX_ENTRIES = 256

# Why a worker cannot be used: code -> what it means and what to do, given the worker's member, the
# detail noted, our Python, our member name, our wire revision and which side to upgrade.
_ADVICE = {
    "version": "runs p2pexec wire revision {detail}, this client {revision}, and the two never work together: "
               "{upgrade}",
    "python": "runs Python {detail}, this client {python}: start that worker with Python {python} "
              "(or run this client with Python {detail})",
    "worker-allow": "its worker serves only the members in its --allow, not {me}: ask {member} to add {me} there",
    "client-allow": "not in this executor's allow=: add {member!r} to allow= to use it",
    "banned": "a worker of {member} broke the protocol ({detail}); this executor uses none of theirs again "
              "(a new executor starts afresh)",
    "unreachable": "offered but could not be reached: {detail}",
    "resources": "cannot meet {detail}",
    "requires": "does not satisfy requires=: {detail}",
}
REASONS = frozenset(_ADVICE)


@dataclass(frozen=True)
class Sighting:
    member: str
    reason: str  # one of REASONS
    detail: str = ""


class Unusable:
    """The client's notes: which member's workers it cannot use, and why, while they are fresh."""

    def __init__(self, python: str) -> None:
        self.python = python
        self._notes: dict[tuple[str, str], tuple[str, float]] = {}  # (member, reason) -> (detail, noted at)

    def note(self, member: str, reason: str, detail: str, now: float) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown reason {reason!r}")
        key = (member, reason)
        if key not in self._notes and len(self._notes) >= MAX_ENTRIES:
            self._forget_stale(now)
            if len(self._notes) >= MAX_ENTRIES:
                return
        old = self._notes.get(key)
        if old is not None and now - old[1] < REMEMBER_SECONDS and detail not in old[0]:
            detail = f"{old[0]} | {detail}"  # another worker of the same member, another reason to tell
        self._notes[key] = (detail[:600], now)

    def forget(self, member: str, reason: str) -> None:
        self._notes.pop((member, reason), None)

    def current(self, now: float) -> list[Sighting]:
        """What is still fresh, by member then reason."""
        self._forget_stale(now)
        return [Sighting(member, reason, detail) for (member, reason), (detail, _) in sorted(self._notes.items())]

    def _forget_stale(self, now: float) -> None:
        self._notes = {k: v for k, v in self._notes.items() if now - v[1] < REMEMBER_SECONDS}


def describe(sightings: list[Sighting], python: str, me: str) -> str:
    """One sentence naming each unusable worker's member, why, and what to do; ``me`` is the client's member."""
    return "; ".join(f"{s.member}: " + _ADVICE[s.reason].format(member=s.member, detail=s.detail, python=python,
                                                                me=me, revision=REVISION, upgrade=_upgrade(s))
                     for s in sightings)


def _upgrade(s: Sighting) -> str:
    """The side of a revision mismatch to upgrade, where the worker's revision says it."""
    theirs = int(s.detail) if s.detail.isdigit() else None
    if theirs is not None and theirs < REVISION:
        return f"ask {s.member} to upgrade p2pexec there (pip install -U p2pexec) and restart the worker"
    if theirs is not None and theirs > REVISION:
        return "upgrade p2pexec here (pip install -U p2pexec)"
    return "upgrade whichever is older (pip install -U p2pexec)"


class DeclineLimiter:
    """The worker's side: decline each request at most every :data:`DECLINE_EVERY` seconds, from a bounded table."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}  # request id -> when we last declined it

    def due(self, req: str, now: float) -> bool:
        last = self._last.get(req)
        if last is not None and now - last < DECLINE_EVERY:
            return False
        if last is None and len(self._last) >= MAX_ENTRIES:
            self._last = {r: t for r, t in self._last.items() if now - t < DECLINE_EVERY}
            if len(self._last) >= MAX_ENTRIES:
                return False
        self._last[req] = now
        return True
