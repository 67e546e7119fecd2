"""Which sessions of a topic get a request, a withdraw or a hello: pure, per topic, no clock of its own.

A broadcast board sends every client's ``request`` to every session, so
each worker reads (and checks the signature of) every request of every
client: board lines and worker CPU grow with clients × workers.  Our board
knows each session's role from the hellos it relays, so it does better:

- A ``request`` goes to a bounded set of worker sessions: the least recently
  asked of those whose last hello said they had free slots, until the
  reached workers' free slots add up to twice the slots asked for, at least
  :data:`MIN_FANOUT` workers and at most :data:`MAX_FANOUT`; only if the free
  ones do not reach that, the least recently asked busy ones too.  The
  workers asked move to the back of the line, so the next request (a
  client asks again every few seconds while it still wants slots) reaches
  others.  Workers of the request's p2pexec wire revision come first: the
  others cannot serve it, and reach it only when too few of its own are
  there (then they offer, and the client tells its user whose worker is
  of another release).  A probe (joblib's ``n_jobs=-1``, counting every
  slot) reaches every worker.
- A ``withdraw`` goes to the workers that got the request it withdraws.
- A worker's hello goes to everyone but the other workers (who never read
  it), a client's only to observers (``p2pexec status``); an observer's
  hello asks everyone to answer, so it goes to everyone.
- Sessions that have not said hello yet (a worker joining, or a plain
  ``ssh sub`` someone watches) get every line, as on a broadcast board.

Lines addressed to one member (offers, declines) the hub routes by name before
this.  On the plain pico.sh pipe service none of this applies: it broadcasts,
and every participant drops what is not for it, as it always did.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..protocol.matching import revision_in

# Workers a request reaches at least (when there are that many).  Every free worker reached offers and holds
# its slots for that offer until the client takes it or withdraws: 8 (for a client wanting 2 slots) kept so
# many workers holding offers for others that requests waited on them (benchmarks/README.md, "A board for
# 1,000 workers").
MIN_FANOUT = 4
MAX_FANOUT = 128  # and at most: a client wanting more slots asks again, reaching the next ones
SLOTS_FACTOR = 2  # reach workers with this many times the free slots asked for
ASKS_PER_SESSION = 64  # requests remembered per sending session, for their withdraws
WITHDRAW_GRACE = 5.0  # seconds a request is remembered past its lifetime

WORKER, CLIENT, OBSERVER = "worker", "client", "observer"


@dataclass
class _Ask:
    """A request relayed: the worker sessions it went to, until ``until`` (the hub's monotonic clock)."""

    workers: set[int]
    until: float


class FanOut:
    """One topic's roles (from hellos) and where its requests went.

    The hub calls :meth:`joined` and :meth:`left` as receivers come and go,
    :meth:`hello` for each hello relayed, and asks :meth:`request`,
    :meth:`withdraw` and :meth:`hello_skips` where a line goes.  Each call costs
    time in proportion to the workers it names, not to the topic's size (and to the workers of another
    wire revision a request passes over, while friends upgrade).
    """

    def __init__(self, fewest: int = MIN_FANOUT, most: int = MAX_FANOUT) -> None:
        if not 0 < fewest <= most:
            raise ValueError("need 0 < fewest <= most")
        self.fewest, self.most = fewest, most
        self.roles: dict[int, str] = {}  # receiver -> the role of its last hello
        self.unknown: dict[int, None] = {}  # receivers that have not said hello (an ordered set)
        # Workers in the order to ask them: least recently asked first.  A worker is in one of the two.
        self.free: collections.OrderedDict[int, int] = collections.OrderedDict()  # -> free slots (> 0)
        self.busy: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.revisions: dict[int, int | None] = {}  # worker -> the wire revision its hello said
        self._asks: dict[tuple[int, str], _Ask] = {}  # (sending session, request id) -> where it went
        self._asks_of: dict[int, collections.OrderedDict[tuple[int, str], None]] = {}  # sender -> its asks

    # -- sessions

    def joined(self, sid: int) -> None:
        """A sub or pipe joined the topic."""
        self.unknown[sid] = None

    def left(self, sid: int) -> None:
        """A session left (idempotent)."""
        self.unknown.pop(sid, None)
        self.roles.pop(sid, None)
        self.free.pop(sid, None)
        self.busy.pop(sid, None)
        self.revisions.pop(sid, None)
        for key in self._asks_of.pop(sid, {}):
            self._asks.pop(key, None)

    def hello(self, sid: int, body: Mapping[str, Any]) -> None:
        """Session ``sid`` said hello with ``body``: note its role and, for a worker, whether it has
        free slots (a worker that does not say is taken to have some).  A worker whose state changed
        goes to the front of its line: it has news."""
        if sid not in self.unknown and sid not in self.roles:
            return  # not a receiver (a pub): it never gets lines
        role = body.get("role")
        role = role if isinstance(role, str) else "?"
        self.unknown.pop(sid, None)
        self.roles[sid] = role
        if role != WORKER:
            self.free.pop(sid, None)
            self.busy.pop(sid, None)
            self.revisions.pop(sid, None)
            return
        self.revisions[sid] = revision_in(body)
        free = body.get("free")
        slots = free if isinstance(free, int) and not isinstance(free, bool) else 1
        if slots > 0:
            if sid not in self.free:
                self.busy.pop(sid, None)
                self.free[sid] = slots
                self.free.move_to_end(sid, last=False)
            else:
                self.free[sid] = slots
        elif sid not in self.busy:
            self.free.pop(sid, None)
            self.busy[sid] = None
            self.busy.move_to_end(sid, last=False)

    def role(self, sid: int) -> str | None:
        """The role of ``sid``'s last hello, None before its first."""
        return self.roles.get(sid)

    # -- where lines go

    def hello_skips(self, role: Any) -> frozenset[str]:
        """The roles that do not get a hello of ``role``: nobody reads a worker's hello but clients and
        observers, nor a client's but observers."""
        if role == WORKER:
            return frozenset({WORKER})
        if role == CLIENT:
            return frozenset({WORKER, CLIENT})
        return frozenset()

    def request(self, sender: int, body: Mapping[str, Any], lifetime: float, now: float) -> list[int]:
        """The worker sessions that get a request (``body``) from session ``sender``, in the order
        chosen; they are remembered for its withdraw for ``lifetime`` seconds (and a grace)."""
        n = body.get("n")
        n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
        if body.get("probe") is True:  # counting every slot: every worker
            chosen = [sid for sid in (*self.free, *self.busy) if sid != sender]
        else:
            chosen = self._choose(sender, n, revision_in(body))
            for sid in chosen:
                (self.free if sid in self.free else self.busy).move_to_end(sid)
        req = body.get("req")
        if isinstance(req, str):
            self._remember(sender, (sender, req), chosen, now + max(0.0, lifetime) + WITHDRAW_GRACE, now)
        return chosen

    def _choose(self, sender: int, n: int, revision: int | None) -> list[int]:
        slots = SLOTS_FACTOR * n
        chosen: list[int] = []
        reached = 0
        for same in (True, False):  # (another revision's workers only when too few of its own are there)
            for line in (self.free, self.busy):
                for sid, free in line.items():
                    if len(chosen) >= self.most or (len(chosen) >= self.fewest and reached >= slots):
                        return chosen
                    if sid != sender and (self.revisions[sid] == revision) == same:
                        chosen.append(sid)
                        reached += free if free is not None else 1  # a busy worker may free a slot meanwhile
        return chosen

    def _remember(self, sender: int, key: tuple[int, str], workers: Iterable[int], until: float,
                  now: float) -> None:
        ask = self._asks.get(key)
        if ask is None or ask.until < now:
            ask = self._asks[key] = _Ask(set(), until)
        ask.workers.update(workers)
        ask.until = max(ask.until, until)
        mine = self._asks_of.setdefault(sender, collections.OrderedDict())
        mine[key] = None
        mine.move_to_end(key)
        while len(mine) > ASKS_PER_SESSION:
            old, _ = mine.popitem(last=False)
            self._asks.pop(old, None)

    def withdraw(self, sender: int, req: Any, now: float) -> list[int]:
        """The worker sessions that got request ``req`` of session ``sender`` (by any of its repeats,
        within its lifetime) and are still workers here: they get its withdraw.  (A client that
        reconnected withdraws nothing it asked on its old session: those workers forget the request
        when it expires, as on a broadcast board after a lost line.)"""
        ask = self._asks.get((sender, req)) if isinstance(req, str) else None
        if ask is None or ask.until < now:
            return []
        return sorted(sid for sid in ask.workers if sid != sender and (sid in self.free or sid in self.busy))

    def asked(self) -> int:
        """How many requests are remembered (for tests and bounds)."""
        return len(self._asks)
