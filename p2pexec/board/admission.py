"""Which TCP connections the board lets in, and when it gives up on them: no sockets, no clock.

A connection goes through three stages, and each has limits, counted per
source (an IPv4 address, or an IPv6 /64, which one subscriber usually holds
whole) and in all::

    accepted --key exchange done--> handshaken --key accepted--> authenticated
    |<-- handshake_timeout -->|
    |<------------- auth_timeout ------------->|

One source, or a few, cannot fill the board with sockets that never log in:
each source may hold ``handshakes_per_source`` connections still exchanging
keys, ``unauthenticated_per_source`` not yet logged in (those included) and
``connections_per_source`` in all; and unauthenticated connections together
may hold at most ``max_unauthenticated`` of the ``max_connections``, so the
rest stays for members who have logged in.

The server reports events (:meth:`Admission.connect`, ``handshaken``,
``authenticated``, ``closed``) and the time; :meth:`Admission.tick` names the
connections past their deadline, for the server to close.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, TypeVar

from ..protocol.sources import source_of

K = TypeVar("K", bound=Hashable)  # how the server names a connection


@dataclass(frozen=True)
class Limits:
    """The board's admission limits; defaults for a public board of a few hundred members.

    Several members behind one NAT share a source, and a LocalCluster runs
    everything from 127.0.0.1, so the per-source limits on logged-in
    connections are loose; those on strangers are tight.  A key exchange
    takes well under a second even across the world, and members log in with
    a key, never a typed password: 10 s and 20 s leave ample room for a slow
    link or a busy board, and are what a flood of silent sockets costs.
    """

    max_connections: int = 512
    max_unauthenticated: int | None = None  # None: three quarters of max_connections
    connections_per_source: int = 128
    unauthenticated_per_source: int = 16
    handshakes_per_source: int = 8
    handshake_timeout: float = 10.0  # from accept to the end of the key exchange
    auth_timeout: float = 20.0  # from accept to logged in

    def __post_init__(self) -> None:
        counts = (self.max_connections, self.unauthenticated_cap, self.connections_per_source,
                  self.unauthenticated_per_source, self.handshakes_per_source)
        if min(counts) <= 0 or not (self.handshake_timeout > 0 and self.auth_timeout > 0):
            raise ValueError("admission limits must be positive")
        if self.unauthenticated_cap > self.max_connections:
            raise ValueError("max_unauthenticated may not exceed max_connections")

    @property
    def unauthenticated_cap(self) -> int:
        if self.max_unauthenticated is not None:
            return self.max_unauthenticated
        return max(1, self.max_connections * 3 // 4)


def _source(host: str) -> str:
    """The source a connection counts against; a peer name that is no IP address counts on its own."""
    try:
        return source_of(host)
    except ValueError:
        return host


class Stage(Enum):
    HANDSHAKE = "handshake"  #: accepted, still exchanging keys
    UNAUTHENTICATED = "unauthenticated"  #: keys exchanged, not logged in yet
    AUTHENTICATED = "authenticated"  #: a member (or an invitee)


@dataclass
class _Entry:
    source: str
    stage: Stage
    handshake_deadline: float
    auth_deadline: float


@dataclass
class _Counts:
    total: int = 0
    unauthenticated: int = 0  # handshakes included
    handshakes: int = 0


@dataclass
class Admission(Generic[K]):
    """The admission state: who is connected, at which stage, until when.

    Refusals are counted by reason in :attr:`refused`, deadlines in
    :attr:`expired`.
    """

    limits: Limits = field(default_factory=Limits)
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    expired: collections.Counter[str] = field(default_factory=collections.Counter)
    _conns: dict[K, _Entry] = field(default_factory=dict)
    _sources: dict[str, _Counts] = field(default_factory=dict)
    _all: _Counts = field(default_factory=_Counts)

    def connect(self, conn: K, host: str, now: float) -> str | None:
        """A connection from ``host`` was accepted: None to serve it, else why to close it now."""
        if conn in self._conns:
            raise RuntimeError(f"connection {conn!r} is already admitted")
        source = _source(host)
        counts = self._sources.get(source, _Counts())
        lim = self.limits
        reason = ("max-connections" if self._all.total >= lim.max_connections else
                  "max-unauthenticated" if self._all.unauthenticated >= lim.unauthenticated_cap else
                  "connections-per-source" if counts.total >= lim.connections_per_source else
                  "unauthenticated-per-source" if counts.unauthenticated >= lim.unauthenticated_per_source else
                  "handshakes-per-source" if counts.handshakes >= lim.handshakes_per_source else None)
        if reason is not None:
            self.refused[reason] += 1
            return reason
        self._sources[source] = counts
        self._conns[conn] = _Entry(source, Stage.HANDSHAKE, now + lim.handshake_timeout, now + lim.auth_timeout)
        self._count(source, Stage.HANDSHAKE, +1)
        return None

    def handshaken(self, conn: K) -> None:
        """The key exchange is done (ignored unless ``conn`` was still at it)."""
        self._move(conn, Stage.HANDSHAKE, Stage.UNAUTHENTICATED)

    def authenticated(self, conn: K) -> None:
        """``conn`` logged in: it no longer counts against the limits on strangers, nor has a deadline."""
        self._move(conn, Stage.HANDSHAKE, Stage.AUTHENTICATED)  # paramiko reports no kex end on its own
        self._move(conn, Stage.UNAUTHENTICATED, Stage.AUTHENTICATED)

    def closed(self, conn: K) -> None:
        """``conn`` is gone (idempotent)."""
        entry = self._conns.pop(conn, None)
        if entry is not None:
            self._count(entry.source, entry.stage, -1)
            if not self._sources[entry.source].total:
                del self._sources[entry.source]

    def tick(self, now: float) -> list[tuple[K, str]]:
        """The connections past their deadline, with the deadline's name; they count as closed from now."""
        late = [(conn, reason) for conn, entry in self._conns.items()
                if (reason := self._overdue(entry, now)) is not None]
        for conn, reason in late:
            self.expired[reason] += 1
            self.closed(conn)
        return late

    def next_deadline(self) -> float:
        """When :meth:`tick` may next have something to say (``inf`` if never)."""
        return min((e.handshake_deadline if e.stage is Stage.HANDSHAKE else e.auth_deadline
                    for e in self._conns.values() if e.stage is not Stage.AUTHENTICATED), default=math.inf)

    def stage(self, conn: K) -> Stage | None:
        entry = self._conns.get(conn)
        return entry.stage if entry is not None else None

    def counts(self, host: str | None = None) -> dict[str, int]:
        """Open connections, unauthenticated ones and handshakes: in all, or of ``host``'s source."""
        c = self._all if host is None else self._sources.get(_source(host), _Counts())
        return {"total": c.total, "unauthenticated": c.unauthenticated, "handshakes": c.handshakes}

    def _overdue(self, entry: _Entry, now: float) -> str | None:
        if entry.stage is Stage.HANDSHAKE and now >= entry.handshake_deadline:
            return "handshake-timeout"
        if entry.stage is not Stage.AUTHENTICATED and now >= entry.auth_deadline:
            return "auth-timeout"
        return None

    def _move(self, conn: K, old: Stage, new: Stage) -> None:
        entry = self._conns.get(conn)
        if entry is None or entry.stage is not old:
            return
        self._count(entry.source, old, -1)
        entry.stage = new
        self._count(entry.source, new, +1)

    def _count(self, source: str, stage: Stage, delta: int) -> None:
        counts = self._sources[source]
        for c in (counts, self._all):
            c.total += delta
            c.unauthenticated += delta * (stage is not Stage.AUTHENTICATED)
            c.handshakes += delta * (stage is Stage.HANDSHAKE)


@dataclass
class LogLimiter:
    """At most one log line per reason every ``interval`` seconds, telling how many it stands for."""

    interval: float = 60.0
    _pending: collections.Counter[str] = field(default_factory=collections.Counter)
    _last: dict[str, float] = field(default_factory=dict)

    def hit(self, reason: str, now: float) -> int:
        """Count one event; the number of events to log now (this one included), or 0 to stay quiet."""
        self._pending[reason] += 1
        last = self._last.get(reason)
        if last is not None and now - last < self.interval:
            return 0
        self._last[reason] = now
        return self._pending.pop(reason)
