"""The worker's decisions, without sockets, processes or a clock: which requests it answers and how, what
it offers to whom, which accepts become leases on which slots, when a slot leaves its lease, and when
the board should hear that its slots turned busy or free.

The daemon (:mod:`.daemon`) reports what happens and the time, and does what the core answers::

    daemon                                    WorkerCore                      answers
    ──────                                    ──────────                      ───────
    a request on the board ──── request ────► admission, Sharing        ──► Decline, Offer, Poke
    a withdraw on the board ─── withdraw ───► Sharing                   ──► Offer (to whoever else waits)
    an offer's hold is over ─── look_again ─► Sharing, Reservations     ──► Offer, News
    an accept on a stream ───── admit ──────► offers, Reservations      ──► Grant, None (a race), ProtocolError
    a lease's task boundary ─── give_slot ──► Sharing.owed              ──► the slot leaves; Offer to who it is owed
    a lease ended ───────────── lease_ended ► Reservations, Sharing     ──► Offer, News
    every HELLO_EVERY ───────── tick ───────► expiry of offers, waits
    first SIGINT ────────────── drain ──────► no more offers or leases  ──► Poke

Each lease's own decisions (credit, hand-backs, its end) are in :mod:`.lease_decisions`.  Like the
board's hub, the core is not thread-safe: the daemon calls it from its trio thread only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ProtocolError
from ..protocol import messages
from ..protocol.matching import REVISION, python_compatible, revision_in, slots_to_offer
from ..protocol.resources import ANY, Need, Reservations, Resources, unmet
from ..protocol.sharing import Party, Sharing, Want
from ..protocol.unusable import DeclineLimiter

log = logging.getLogger("p2pexec.worker")

OFFER_TTL = 15.0
HELLO_NEWS_EVERY = 1.0  # a hello when a request finds us busy (or free) unlike our last hello said, at most this often


# -- actions: what the daemon must do after a call

@dataclass
class Offer:
    """Offer ``slots`` slots to ``request`` on the board, under id ``id`` with key pair ``kx``; an offer with a
    ``party`` holds its slots for OFFER_HOLD seconds, after which the daemon calls :meth:`WorkerCore.look_again`."""

    id: str
    request: messages.Message
    slots: int
    exp: float
    kx: tuple[bytes, bytes]  # this offer's own X25519 key pair: one lease's keys reveal no other's
    need: Need = ANY  # what the request asked of each slot
    party: Party | None = None  # whose request it answers (None: a probe, which holds no slots)

    @property
    def req(self) -> str:
        return self.request["req"]

    @property
    def client(self) -> str:
        return self.request.sender


@dataclass(frozen=True)
class Decline:
    """Tell ``request``'s sender that this worker will not serve it, and why (``why`` is in unusable.REASONS)."""

    request: messages.Message
    why: str
    detail: str = ""


class Poke:
    """Someone started waiting (or the worker is stopping): each live lease looks whether it owes a slot."""


class News:
    """Send a hello now: our slots turned all busy, or some free, unlike our last hello said."""


POKE, NEWS = Poke(), News()
Action = Offer | Decline | Poke | News


@dataclass(frozen=True)
class Grant:
    """An accept became a lease of ``offer`` on these slots; each task process runs under ``limit`` bytes, and
    at most ``recycle`` of its tasks (the client's max_tasks_per_child; None: no limit)."""

    offer: Offer
    slots: tuple[int, ...]
    limit: int | None
    recycle: int | None = None


def need_in(request: messages.Message) -> Need:
    """What a request asks of each slot (ValueError or TypeError if it is garbled)."""
    return Need.from_json(request.body["need"]) if "need" in request.body else ANY


def party_of(request: messages.Message) -> Party:
    """Who asks: the member, and their client (its ``client`` id; the request id from older clients)."""
    client = request.body.get("client")
    return Party(request.sender, client if isinstance(client, str) else request["req"])


class WorkerCore:
    """One worker's decisions over its slots (time: wall-clock seconds, passed in)."""

    def __init__(self, resources: Resources, *, me: str, python: str, allow: frozenset[str] | None = None,
                 requires_unmet: Callable[[Need], str | None] = lambda need: None,
                 new_keys: Callable[[], tuple[bytes, bytes]] = lambda: (b"", b""), new_id: Callable[[], str] = messages.new_id,
                 name: str | None = None) -> None:
        self.resources = resources
        self.me = me  # whom an accept must name
        self.python = python  # what we advertise: requests for another Python are declined
        self.allow = allow  # --allow: the only members served (None: every member)
        self._requires_unmet = requires_unmet  # what of a need's requires= this machine lacks (it reads metadata)
        self._new_keys, self._new_id = new_keys, new_id
        self.reservations = Reservations(resources)  # which slots, memory and cores each lease holds
        self.sharing = Sharing(name or new_id())  # who waits for our slots, who holds them (fair sharing)
        self.offers: dict[str, Offer] = {}  # live offers by id: an accept must name one
        self.joining = 0  # relay joins under way: requests wait for them, so offers carry addresses that work
        self.draining = False  # stopping: no new offers or leases; live ones end once their running tasks are answered
        self._declines = DeclineLimiter()
        self._said_free = (True, -1e9)  # whether our last hello said we had free slots, and when

    # -- the board
    def request(self, msg: messages.Message, now: float) -> list[Action]:
        """A request: decline it, offer a probe what is free, or let it wait for the fair share it is due."""
        if self.allow is not None and msg.sender not in self.allow:
            log.debug("ignoring a request from %s: not in --allow", msg.sender)
            return self._decline(msg, "worker-allow", now)
        if revision_in(msg.body) != REVISION:
            return self._decline(msg, "version", now)
        if not python_compatible(self.python, msg["py"]):
            return self._decline(msg, "python", now)
        try:
            need = need_in(msg)
        except (ValueError, TypeError) as exc:
            log.debug("ignoring a request from %s with a bad resource need: %s", msg.sender, exc)
            return []
        why_not = unmet(need, self.resources)
        if why_not is not None:
            return self._decline(msg, "resources", now, f"{why_not}; it lends {self.resources.describe()}")
        unsatisfied = self._requires_unmet(need)
        if unsatisfied is not None:
            return self._decline(msg, "requires", now, unsatisfied)
        if self.draining:
            return []  # (a request heard while leaving would let a slot leave a lease for an offer never made)
        if msg.body.get("probe") is True:  # a client counting slots (joblib's n_jobs=-1): offer what is free, no more
            probe = None if self.joining else self._offer(msg, self.reservations.available(need), None, now)
            return [probe] if probe is not None else []
        self.sharing.wait(Want(msg["req"], party_of(msg), max(1, msg["n"]), msg.exp, msg))
        actions = [] if self.joining else self.look_again(now)  # (else they wait for the relay's addresses)
        if msg["req"] in self.sharing.waiting:
            actions.append(POKE)  # a lease may owe it a slot (fair sharing)
        return actions

    def withdraw(self, req: str, member: str, now: float) -> list[Action]:
        """``member`` wants nothing more for ``req``: what its offers held goes to whoever else waits."""
        self.sharing.withdraw(req, member)
        return self.look_again(now)

    def look_again(self, now: float, owed: Want | None = None) -> list[Action]:
        """Offer what is free to the waiting requests, one slot at a time to the most deserving
        (see :mod:`p2pexec.protocol.sharing`), first a slot to ``owed`` if a lease just gave it one;
        an offer holds its slots for a few seconds.  Called whenever slots may have come free."""
        if self.draining:
            return []
        actions: list[Action] = [NEWS] if self._news_due(now) else []
        self.sharing.expire(now)
        promised = self.sharing.offered_slots(now)
        given = [(owed, 1)] if owed is not None else []
        for want, slots in given + self.sharing.allocate(
                lambda w: self.reservations.available(need_in(w.request)) - promised - len(given), now):
            offer = self._offer(want.request, slots, want.party, now)
            if offer is not None:
                self.sharing.offered(offer.id, want, offer.slots, now)
                actions.append(offer)
        return actions

    def tick(self, now: float) -> None:
        """Forget offers, requests and holds past their time."""
        self.offers = {k: o for k, o in self.offers.items() if o.exp > now}
        self.sharing.expire(now)

    def hello_free(self, now: float) -> int:
        """Free slots, for the hello about to be sent (our board sends requests to free workers first)."""
        free = self.resources.slots - len(self.reservations.busy)
        self._said_free = (free > 0, now)
        return free

    def drain(self) -> list[Action]:
        """Stop taking work: no more offers or accepts; each lease hands back what it has not started."""
        self.draining = True
        self.offers.clear()
        self.sharing.waiting.clear()
        return [POKE]

    @property
    def drained(self) -> bool:
        """Draining, and every slot is back."""
        return self.draining and not self.reservations.busy

    # -- leases
    def admit(self, accept: messages.Message, now: float) -> Grant | None:
        """An accept, its signature checked: the lease it opens, or None when its offer's slots went to another
        accept first (a race, not an attack); ProtocolError when it may open none."""
        if self.draining:
            raise ProtocolError("an accept came while this worker is stopping; it takes no new lease")
        offer = self.offers.get(accept["offer"]) if accept.type == "accept" else None
        if offer is None or accept["worker"] != self.me or offer.client != accept.sender:
            raise ProtocolError(f"{accept.sender} sent an accept for no offer of ours")
        if self.allow is not None and accept.sender not in self.allow:
            raise ProtocolError(f"{accept.sender} is not in --allow")
        recycle = accept.body.get("recycle")
        if recycle is not None and (type(recycle) is not int or recycle < 1):
            raise ProtocolError(f"{accept.sender} sent an accept with max_tasks_per_child {recycle!r}")
        del self.offers[offer.id]
        self.sharing.ended(offer.id, now)  # its hold: the reservation below holds what it takes
        count = min(accept["slots"], offer.slots, self.reservations.available(offer.need))
        held = self.reservations.reserve(offer.id, offer.need, count) if count > 0 else None
        if not held:
            return None
        self.sharing.leased(offer.id, offer.req, offer.party or Party(accept.sender, offer.req), len(held), now)
        return Grant(offer, held, self.reservations.limit_of(offer.need), recycle)

    def owed(self, lease: str, now: float) -> Want | None:
        """The waiting request that ``lease`` owes a slot at its next task boundary, if any."""
        return self.sharing.owed(lease, now)

    def contended(self, req: str, now: float) -> bool:
        """Does a request other than ``req`` wait for a slot here?"""
        return self.sharing.contended(req, now)

    def give_slot(self, lease: str, slot: int, now: float) -> tuple[Want, list[Action]] | None:
        """Between two of its tasks, ``lease`` gives ``slot`` to the request it owes one, if any: the
        request it went to, and the offers to make."""
        owed = self.sharing.owed(lease, now)
        if owed is None:
            return None
        self.reservations.release_slot(lease, slot)
        self.sharing.shrunk(lease, now)
        return owed, self.look_again(now, owed)

    def lease_ended(self, lease: str, now: float) -> list[Action]:
        """Its slots are free again: offer them."""
        self.reservations.release(lease)
        self.sharing.ended(lease, now)
        return self.look_again(now)

    # -- helpers
    def _offer(self, request: messages.Message, slots: int, party: Party | None, now: float) -> Offer | None:
        slots = slots_to_offer(slots, request["n"])
        if slots <= 0:
            return None
        offer = Offer(self._new_id(), request, slots, now + OFFER_TTL, self._new_keys(), need_in(request), party)
        self.offers[offer.id] = offer
        return offer

    def _decline(self, request: messages.Message, why: str, now: float, detail: str = "") -> list[Action]:
        """Rate-limited: a client's no-worker warning only needs to know why, not each time."""
        return [Decline(request, why, detail[:1000])] if self._declines.due(request["req"], now) else []

    def _news_due(self, now: float) -> bool:
        """Our slots turned from all busy to some free, or back, unlike our last hello said (at most once a
        second)."""
        free = self.resources.slots > len(self.reservations.busy)
        return now - self._said_free[1] >= HELLO_NEWS_EVERY and free != self._said_free[0]
