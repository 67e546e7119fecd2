"""Which sessions of a topic get a request, a withdraw or a hello: pure, per topic, no clock of its own.

A broadcast board sends every client's ``request`` to every session, so
each worker reads (and checks the signature of) every request of every
client: board lines and worker CPU grow with clients × workers.  Our board
knows each session's role from the hellos it relays, so it does better:

- A ``request`` goes to a bounded set of worker sessions: the least recently
  asked of those whose last hello said they had free slots, until the
  reached workers' free slots add up to twice the slots asked for, at least
  :data:`MIN_FANOUT` workers and at most :data:`MAX_FANOUT`; only if the free
  ones do not reach that, the least recently asked of those holding offers
  (below), then busy ones too.  The
  workers asked move to the back of the line, so the next request (a
  client asks again every few seconds while it still wants slots) reaches
  others.  A probe (joblib's ``n_jobs=-1``, counting every slot) reaches every
  worker.
- An offer a worker makes to a request holds its slots from other requests
  until the client takes it or withdraws, or for :data:`.sharing.OFFER_HOLD`
  seconds; the worker's hellos do not count it (they say what its leases
  hold).  The board relays both the offer and the withdraw, so it counts the
  offered slots as held from one to the other (or for that long): a worker
  whose free slots are all held waits in a line of its own, after the free
  ones.  Else a request reaches workers busy offering to others and waits
  for their holds to end (measured: with 100 workers and 50 clients, three
  requests in four reached workers holding an offer).
- A ``withdraw`` goes to the workers that got the request it withdraws, or
  offered to it.
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
import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..protocol.sharing import OFFER_HOLD

MIN_FANOUT = 8  # workers a request reaches at least (when there are that many)
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
    probe: bool = False  # a probe's offers hold no slots
    withdrawn: bool = False  # since its last repeat: an offer that crossed the withdraw holds nothing


class FanOut:
    """One topic's roles (from hellos) and where its requests went.

    The hub calls :meth:`joined` and :meth:`left` as receivers come and go,
    :meth:`hello` for each hello relayed and :meth:`offered` for each offer, and asks
    :meth:`request`, :meth:`withdraw` and :meth:`hello_skips` where a line goes.  Each
    call costs time in proportion to the workers it names (and, amortised, the holds that
    end meanwhile), not to the topic's size.
    """

    def __init__(self, fewest: int = MIN_FANOUT, most: int = MAX_FANOUT, hold: float = OFFER_HOLD) -> None:
        if not 0 < fewest <= most:
            raise ValueError("need 0 < fewest <= most")
        self.fewest, self.most, self.hold = fewest, most, hold
        self.roles: dict[int, str] = {}  # receiver -> the role of its last hello
        self.unknown: dict[int, None] = {}  # receivers that have not said hello (an ordered set)
        # Workers in the order to ask them: least recently asked first.  A worker is in one of the three.
        self.free: collections.OrderedDict[int, int] = collections.OrderedDict()  # -> free slots (> 0)
        self.held: collections.OrderedDict[int, int] = collections.OrderedDict()  # the same, all under offers
        self.busy: collections.OrderedDict[int, None] = collections.OrderedDict()
        # Offers relayed and not yet withdrawn nor over: worker -> (client session, request id) -> (slots, until)
        self._offers: dict[int, dict[tuple[int, str], tuple[int, float]]] = {}
        self._ends: list[tuple[float, int]] = []  # (until, worker) for each hold: a heap, when to look again
        self._now = float("-inf")  # the latest ``now`` passed (hellos come without one)
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
        self.held.pop(sid, None)
        self.busy.pop(sid, None)
        self._offers.pop(sid, None)
        for key in self._asks_of.pop(sid, {}):
            self._asks.pop(key, None)  # (its offers' holds end on their own)

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
            self.held.pop(sid, None)
            self.busy.pop(sid, None)
            self._offers.pop(sid, None)
            return
        free = body.get("free")
        slots = free if isinstance(free, int) and not isinstance(free, bool) else 1
        if slots > 0:
            news = sid not in self.free and sid not in self.held  # it was busy, or is new
            self.busy.pop(sid, None)
            (self.held if sid in self.held else self.free)[sid] = slots
            self._settle(sid, now=None, front=news)
        elif sid not in self.busy:
            self.free.pop(sid, None)
            self.held.pop(sid, None)
            self.busy[sid] = None
            self.busy.move_to_end(sid, last=False)

    def offered(self, worker: int, to: Iterable[int], body: Mapping[str, Any], now: float) -> None:
        """Session ``worker`` offered ``body["slots"]`` slots to request ``body["req"]`` of one of the sessions
        ``to`` (the addressee's): they are held until its withdraw, or for ``hold`` seconds."""
        self._expire(now)
        req, slots = body.get("req"), body.get("slots")
        if not isinstance(req, str) or not isinstance(slots, int) or isinstance(slots, bool) or slots <= 0 \
                or self.roles.get(worker) != WORKER:
            return
        for client in to:
            ask = self._asks.get((client, req))
            if ask is None or ask.until < now or ask.probe or ask.withdrawn:
                continue  # (the worker lets go of what it offered to a probe, or once the withdraw reaches it)
            ask.workers.add(worker)  # its withdraw goes there too
            self._offers.setdefault(worker, {})[client, req] = (slots, now + self.hold)
            heapq.heappush(self._ends, (now + self.hold, worker))
            if worker in self.held:
                self.held.move_to_end(worker)  # the held line is in the order of their last offers
            self._settle(worker, now)
            return

    def _holding(self, worker: int, now: float | None) -> int:
        """The slots ``worker`` holds under offers at ``now`` (None: the latest time a call passed)."""
        now = self._now if now is None else now
        return sum(slots for slots, until in self._offers.get(worker, {}).values() if until > now)

    def _prune(self, worker: int, now: float) -> None:
        """Forget ``worker``'s offers whose holds are over."""
        mine = self._offers.get(worker)
        if mine is not None:
            for key in [key for key, (_, until) in mine.items() if until <= now]:
                del mine[key]
            if not mine:
                del self._offers[worker]

    def _settle(self, worker: int, now: float | None, front: bool = False) -> None:
        """Put a worker that says it has free slots in the held line if offers hold them all, else in the free
        line; one that moves goes to the end of its new line (to the front of the free line with ``front``:
        it has news), one that stays keeps its place."""
        line, other = (self.free, self.held) if worker in self.free else (self.held, self.free)
        if worker not in line:
            line, other = other, line
        if worker not in line:
            return  # busy
        free = line[worker]
        target = self.held if self._holding(worker, now) >= free else self.free
        if target is not line:
            del line[worker]
            target[worker] = free
        if front and target is self.free:
            target.move_to_end(worker, last=False)

    def _release(self, worker: int, key: tuple[int, str], now: float) -> None:
        """``worker``'s offer to ``key`` (client session, request id) was withdrawn: its slots are free."""
        mine = self._offers.get(worker)
        if mine is not None and mine.pop(key, None) is not None:
            self._prune(worker, now)
            self._settle(worker, now)

    def _expire(self, now: float) -> None:
        """Forget the holds that are over by ``now``: a held worker with free slots again goes back to the
        free line (each hold is looked at once, when it ends)."""
        self._now = max(self._now, now)
        while self._ends and self._ends[0][0] <= now:
            _, worker = heapq.heappop(self._ends)
            self._prune(worker, now)
            self._settle(worker, now)

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
        probe = body.get("probe") is True
        self._expire(now)
        if probe:  # counting every slot: every worker
            chosen = [sid for sid in (*self.free, *self.held, *self.busy) if sid != sender]
        else:
            chosen = self._choose(sender, n, now)
            for sid in chosen:
                if sid not in self.held:  # (which stays in the order of their last offers)
                    (self.free if sid in self.free else self.busy).move_to_end(sid)
        req = body.get("req")
        if isinstance(req, str):
            self._remember(sender, (sender, req), chosen, now + max(0.0, lifetime) + WITHDRAW_GRACE, now, probe)
        return chosen

    def _choose(self, sender: int, n: int, now: float) -> list[int]:
        slots = SLOTS_FACTOR * n
        chosen: list[int] = []
        reached = 0
        lines: tuple[Mapping[int, int | None], ...] = (self.free, self.held, self.busy)
        for line in lines:
            for sid, free in line.items():
                if len(chosen) >= self.most or (len(chosen) >= self.fewest and reached >= slots):
                    return chosen
                if sid != sender:
                    chosen.append(sid)
                    if line is self.free and free is not None:
                        reached += free - (self._holding(sid, now) if sid in self._offers else 0)
                    else:
                        reached += 1  # a held or busy worker may free a slot meanwhile
        return chosen

    def _remember(self, sender: int, key: tuple[int, str], workers: Iterable[int], until: float,
                  now: float, probe: bool) -> None:
        ask = self._asks.get(key)
        if ask is None or ask.until < now:
            ask = self._asks[key] = _Ask(set(), until, probe)
        ask.workers.update(workers)
        ask.withdrawn, ask.probe = False, probe  # (as its latest repeat says)
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
        self._expire(now)
        ask = self._asks.get((sender, req)) if isinstance(req, str) else None
        if ask is None or ask.until < now:
            return []
        ask.withdrawn = True
        for sid in ask.workers:
            self._release(sid, (sender, req), now)
        return sorted(sid for sid in ask.workers
                      if sid != sender and (sid in self.free or sid in self.held or sid in self.busy))

    def asked(self) -> int:
        """How many requests are remembered (for tests and bounds)."""
        return len(self._asks)
