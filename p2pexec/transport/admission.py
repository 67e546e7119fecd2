"""Who may hold a connection to our libp2p port before proving anything: the rules, without sockets.

A stranger with TCP access costs us a socket, a task and a Noise handshake
per connection before we know who it is.  py-libp2p 0.8.1 counts those
against one global inbound limit (250), so ~250 idle sockets locked every
member out.  The rules here bound what one source can hold instead::

    accept() ──open()──> HANDSHAKE ──handshaken()──> PROVING ──proved()──> settled
       │                    │ deadline                 │ deadline
       └─ Refused           └─ closed                  └─ closed
                                        (without proof required: handshaken() settles)

- A *source* is an IPv4 address or an IPv6 /64 (one machine, or one
  customer of a provider, usually holds a whole /64).
- Until a connection is settled it is *unproven* and counts against its
  source (``per_source``) and against a shared pool (``strangers``).
- Sources from which a peer proved membership (a valid lease accept at a
  worker, a relay ticket at a relay) are remembered for ``remember_seconds``;
  when the shared pool is full they draw on a ``reserve`` that strangers
  never touch, so a flood from many addresses still leaves members a way in.
- Every unproven connection has a deadline: ``handshake_seconds`` to finish
  the security handshake, then ``prove_seconds`` to prove membership.

:class:`Admission` does no I/O and reads no clock: callers pass ``now``.
The I/O half is ``Gate`` in :mod:`p2pexec.transport.gate`.
"""

from __future__ import annotations

import enum
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from itertools import count

from ..protocol.sources import source_of


@dataclass(frozen=True)
class Limits:
    """What unproven connections may hold; the defaults hold a loopback flood of 600 sockets (see the tests)."""

    per_source: int = 8  # unproven connections per IPv4 address / IPv6 /64
    strangers: int = 64  # unproven connections in all, from any source
    reserve: int = 64  # more, only for sources a member came from
    handshake_seconds: float = 5.0  # to finish Noise (ms on a LAN, ~1 s on a slow link)
    prove_seconds: float | None = None  # then to prove membership; None: nobody has to
    remember_seconds: float = 24 * 3600.0  # how long a member's source stays known
    remember_at_most: int = 4096  # member sources remembered, oldest forgotten first

    def __post_init__(self) -> None:
        if self.per_source < 1 or self.strangers < 1 or self.reserve < 0:
            raise ValueError(f"per_source and strangers must be at least 1 and reserve at least 0, not {self}")
        if self.handshake_seconds <= 0 or (self.prove_seconds is not None and self.prove_seconds <= 0):
            raise ValueError(f"deadlines must be positive, not {self}")


class Stage(enum.Enum):
    HANDSHAKE = "handshake"  #: security handshake under way
    PROVING = "proving"  #: authenticated peer, membership not proved yet
    SETTLED = "settled"  #: proved (or no proof asked): no longer counted


class Pool(enum.Enum):
    STRANGERS = "strangers"  #: the shared pool
    RESERVE = "reserve"  #: room kept for members' sources


@dataclass(eq=False)
class Ticket:
    """One admitted connection; hand it back to :meth:`Admission.close` however the connection ends."""

    id: int
    source: str
    pool: Pool
    deadline: float  # close the connection at this time unless it moved on
    stage: Stage = Stage.HANDSHAKE


@dataclass(frozen=True)
class Refused:
    source: str
    reason: str  # "source": its source is at per_source; "full": no room left for it


@dataclass
class Admission:
    """Counts unproven connections per source and per pool, and remembers members' sources."""

    limits: Limits = Limits()
    unproven: Counter[str] = field(default_factory=Counter)  # source -> its unsettled tickets
    in_pool: Counter[Pool] = field(default_factory=Counter)  # pool -> unsettled tickets drawn on it
    refused: Counter[str] = field(default_factory=Counter)  # reason -> connections refused, ever
    dropped: Counter[Stage] = field(default_factory=Counter)  # stage -> connections closed at its deadline, ever
    _members: OrderedDict[str, float] = field(default_factory=OrderedDict)  # source -> last proof, oldest first
    _ids: count[int] = field(default_factory=count)

    # -- the state machine -------------------------------------------------------------
    def open(self, ip: str, now: float) -> Ticket | Refused:
        """A TCP connection from ``ip`` was accepted: admit it (a :class:`Ticket`) or refuse it."""
        source = source_of(ip)
        pool: Pool | None = None
        if self.unproven[source] < self.limits.per_source and self.in_pool[Pool.STRANGERS] < self.limits.strangers:
            pool = Pool.STRANGERS
        elif self.in_pool[Pool.RESERVE] < self.limits.reserve and self.is_member(source, now):
            pool = Pool.RESERVE
        if pool is None:
            reason = "source" if self.unproven[source] >= self.limits.per_source else "full"
            self.refused[reason] += 1
            return Refused(source, reason)
        self.unproven[source] += 1
        self.in_pool[pool] += 1
        return Ticket(next(self._ids), source, pool, now + self.limits.handshake_seconds)

    def handshaken(self, ticket: Ticket, now: float) -> bool:
        """The security handshake finished.  True if the peer must now prove membership by ``ticket.deadline``."""
        self._expect(ticket, Stage.HANDSHAKE)
        if self.limits.prove_seconds is None:
            self._settle(ticket)
            return False
        ticket.stage = Stage.PROVING
        ticket.deadline = now + self.limits.prove_seconds
        return True

    def proved(self, ticket: Ticket, now: float) -> None:
        """The peer on this connection proved membership: settle it and remember its source."""
        if ticket.stage is not Stage.SETTLED:
            self._settle(ticket)
        self.remember(ticket.source, now)

    def expired(self, ticket: Ticket) -> None:
        """The connection is being closed at its deadline (counted in :attr:`dropped`)."""
        if ticket.stage is not Stage.SETTLED:
            self.dropped[ticket.stage] += 1

    def close(self, ticket: Ticket) -> None:
        """The connection is gone; its counts (if still unproven) are freed.  Idempotent."""
        if ticket.stage is not Stage.SETTLED:
            self._settle(ticket)

    # -- members' sources ----------------------------------------------------------------
    def remember(self, source: str, now: float) -> None:
        self._members.pop(source, None)
        self._members[source] = now
        while len(self._members) > self.limits.remember_at_most:
            self._members.popitem(last=False)

    def is_member(self, source: str, now: float) -> bool:
        self._forget_before(now - self.limits.remember_seconds)
        return source in self._members

    @property
    def members(self) -> int:
        return len(self._members)

    # -- helpers ---------------------------------------------------------------------------
    def _settle(self, ticket: Ticket) -> None:
        ticket.stage = Stage.SETTLED
        self.unproven[ticket.source] -= 1
        if not self.unproven[ticket.source]:
            del self.unproven[ticket.source]
        self.in_pool[ticket.pool] -= 1

    def _forget_before(self, cutoff: float) -> None:
        while self._members and next(iter(self._members.values())) < cutoff:
            self._members.popitem(last=False)

    @staticmethod
    def _expect(ticket: Ticket, stage: Stage) -> None:
        if ticket.stage is not stage:
            raise RuntimeError(f"connection {ticket.id} is at {ticket.stage.value}, not {stage.value}")


@dataclass
class Reporter:
    """At most one log line per ``every`` seconds about refusals and drops, with what happened since the last."""

    every: float = 10.0
    _last: float = float("-inf")
    _seen: Counter[str] = field(default_factory=Counter)

    def due(self, admission: Admission, now: float) -> dict[str, int] | None:
        """What to report now (counts since the last report), or None: too soon, or nothing new."""
        if now - self._last < self.every:
            return None
        current = Counter({f"refused ({k})": v for k, v in admission.refused.items()})
        current.update({f"dropped at the {k.value} deadline": v for k, v in admission.dropped.items()})
        news = {k: v - self._seen[k] for k, v in current.items() if v > self._seen[k]}
        if not news:
            return None
        self._last, self._seen = now, current
        return news
