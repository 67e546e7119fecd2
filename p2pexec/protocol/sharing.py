"""Who gets a worker's slots, and when a lease gives one back (pure, no I/O).

The policy is fair sharing per member, then per client.  On each worker,
a request whose member holds fewer of its slots (counting offers not yet
taken) than the member of a running lease takes a slot from that lease at
the lease's next task boundary: at once when the gap is two slots or more,
when it is one once the holder has had :data:`QUANTUM` seconds since it last
gained a slot here and the waiter gave none up in the last half quantum (so
one-slot workers take turns, and members outnumbering the slots rotate).  Two
clients of one member share the member's slots the same way.  A running
task is never stopped for it.  Equally deserving requests are served least
recently served first, and otherwise in an order of the worker's own (a
hash of its name), so that workers that see the same requests at the same
moment spread their offers over them instead of all offering to the first.

An offer keeps its slots from other requests for :data:`OFFER_HOLD`
seconds or until it is taken, so a free slot is offered to one request at
a time, not to every request in sight.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

QUANTUM = 5.0  # a slot held this long goes to a waiting member (or client) that holds one fewer here
OFFER_HOLD = 3.0  # an offer not taken within this long frees its slots for other requests
FORGET = 600.0  # when a member or client was last served or gave up a slot is kept this long (ranks, turns)


@dataclass(frozen=True)
class Party:
    """Who holds or wants slots: a member, and one client (executor) of theirs."""

    member: str
    client: str


@dataclass
class Want:
    """A request that waits for slots; ``request`` is the caller's own (the board message)."""

    req: str
    party: Party
    slots: int  # still wanted
    exp: float
    request: Any = None


@dataclass
class _Hold:
    req: str
    party: Party
    slots: int
    until: float | None  # an offer's hold ends then; a lease's (None) when it ends


@dataclass
class Sharing:
    """One worker's view: the requests waiting for it, its offers and leases (time is wall-clock seconds)."""

    name: str  # the worker's own name: its order among equally deserving requests
    quantum: float = QUANTUM
    hold: float = OFFER_HOLD
    waiting: dict[str, Want] = field(default_factory=dict)  # by request id
    _holds: dict[str, _Hold] = field(default_factory=dict)  # by offer id (a lease keeps its offer's id)
    _served: dict[str, float] = field(default_factory=dict)  # member, and client, -> when last given slots
    _lost: dict[str, float] = field(default_factory=dict)  # member, and client, -> when a lease last gave one up
    _spreads: dict[str, bytes] = field(default_factory=dict)  # request -> its place among equals (a hash, kept)

    # -- events
    def wait(self, want: Want) -> None:
        self.waiting[want.req] = want

    def withdraw(self, req: str, member: str) -> None:
        """``member`` wants nothing more for request ``req``: it waits no more, its offers hold nothing."""
        want = self.waiting.get(req)
        if want is not None and want.party.member == member:
            del self.waiting[req]
        self._holds = {k: h for k, h in self._holds.items()
                       if not (h.req == req and h.party.member == member and h.until is not None)}

    def offered(self, offer: str, want: Want, slots: int, now: float) -> None:
        """An offer of ``slots`` went to ``want``, which waits for the rest of what it asked."""
        want.slots -= slots
        if want.slots <= 0:
            self.waiting.pop(want.req, None)
        self._holds[offer] = _Hold(want.req, want.party, slots, now + self.hold)
        self._note_served(want.party, now)

    def leased(self, offer: str, req: str, party: Party, slots: int, now: float) -> None:
        """An offer was taken, for ``slots`` slots: a lease holds them until :meth:`ended`."""
        self._holds[offer] = _Hold(req, party, slots, None)
        self._note_served(party, now)

    def shrunk(self, lease: str, now: float) -> None:
        """A lease gave back one slot."""
        hold = self._holds[lease]
        self._lost["m:" + hold.party.member] = self._lost["c:" + hold.party.client] = now
        hold.slots -= 1
        if hold.slots <= 0:
            del self._holds[lease]

    def ended(self, lease: str, now: float) -> None:
        """A lease ended (or an offer was taken: its hold goes, and :meth:`leased` holds the slots)."""
        hold = self._holds.pop(lease, None)
        if hold is not None and hold.until is None:
            self._lost["m:" + hold.party.member] = self._lost["c:" + hold.party.client] = now

    # -- questions
    def expire(self, now: float) -> None:
        """Drop requests past their expiry, offers past their hold, and who was served long ago (every
        executor is a new client: a worker's life would otherwise keep them all)."""
        self.waiting = {r: w for r, w in self.waiting.items() if w.exp > now}
        self._spreads = {r: spread for r, spread in self._spreads.items() if r in self.waiting}
        self._holds = {k: h for k, h in self._holds.items() if h.until is None or h.until > now}
        self._served = {k: t for k, t in self._served.items() if now - t < FORGET}
        self._lost = {k: t for k, t in self._lost.items() if now - t < self.quantum}

    def offered_slots(self, now: float) -> int:
        """Slots promised to offers not yet taken."""
        return sum(h.slots for h in self._holds.values() if h.until is not None and h.until > now)

    def allocate(self, room: Callable[[Want], int], now: float) -> list[tuple[Want, int]]:
        """How many slots to offer to which waiting requests now, one slot at a time to the most
        deserving; ``room(want)`` is how many slots its need could have before any of these offers."""
        members, clients = self._counts(now)
        live = [w for w in self.waiting.values() if w.exp > now and w.slots > 0]
        rooms = {w.req: room(w) for w in live}
        given: Counter[str] = Counter()
        total = 0
        while live:
            # (Every request is asked about at each one a worker hears: with no slot free this must cost
            # one pass, not a ranking of all of them; a need with no room now gets none later either.)
            live = [w for w in live if rooms[w.req] > total]
            if not live:
                break
            best = min(live, key=lambda w: self._rank(w, members, clients))
            given[best.req] += 1
            total += 1
            members[best.party.member] += 1
            clients[best.party.client] += 1
            if given[best.req] >= best.slots:
                live.remove(best)
        return [(self.waiting[req], count) for req, count in given.items()]

    def contended(self, req: str, now: float) -> bool:
        """Does a request other than ``req`` wait for a slot here?"""
        return any(r != req and w.exp > now for r, w in self.waiting.items())

    def owed(self, lease: str, now: float) -> Want | None:
        """The waiting request that ``lease`` owes one of its slots, at its next task boundary; or None."""
        hold = self._holds.get(lease)
        if not self.waiting or hold is None or hold.until is not None:
            return None  # (asked at every task boundary: nobody waiting must cost nothing)
        members, clients = self._counts(now)
        owed = []
        for want in self.waiting.values():
            if want.exp <= now or want.slots <= 0 or want.party.client == hold.party.client:
                continue  # the client's own other needs take turns by lease_seconds, not here
            if want.party.member != hold.party.member:
                gap = members[hold.party.member] - members[want.party.member]
                held, waited = "m:" + hold.party.member, "m:" + want.party.member
            else:
                gap = clients[hold.party.client] - clients[want.party.client]
                held, waited = "c:" + hold.party.client, "c:" + want.party.client
            # Turns: the holder has had a quantum since it last gained a slot, and the waiter did not just
            # give one up (else the one who yields would take another's slot at once, and never wait).
            if gap >= 2 or (gap == 1 and now - self._served.get(held, 0.0) >= self.quantum
                            and now - self._lost.get(waited, -math.inf) >= self.quantum / 2):
                owed.append(want)
        return min(owed, key=lambda w: self._rank(w, members, clients), default=None)

    def _rank(self, want: Want, members: Counter[str], clients: Counter[str]) -> tuple[Any, ...]:
        """Fewest slots held by the member, then least recently served member; then the same for the client."""
        party = want.party
        return (members[party.member], self._served.get("m:" + party.member, 0.0),
                clients[party.client], self._served.get("c:" + party.client, 0.0), self._spread(want.req))

    def _note_served(self, party: Party, now: float) -> None:
        self._served["m:" + party.member] = self._served["c:" + party.client] = now

    def _counts(self, now: float) -> tuple[Counter[str], Counter[str]]:
        members: Counter[str] = Counter()
        clients: Counter[str] = Counter()
        for h in self._holds.values():
            if h.until is None or h.until > now:
                members[h.party.member] += h.slots
                clients[h.party.client] += h.slots
        return members, clients

    def _spread(self, req: str) -> bytes:
        spread = self._spreads.get(req)
        if spread is None:
            spread = self._spreads[req] = hashlib.blake2b(f"{self.name}\0{req}".encode(), digest_size=8).digest()
        return spread
