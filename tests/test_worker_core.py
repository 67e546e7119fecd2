"""The worker's decisions on their own (worker/decisions.py, worker/lease_decisions.py): no board, no
libp2p, no task processes and no clock, so each rule is checked directly, and a hypothesis state machine
drives them with random requests, withdrawals, accepts, tasks, cancellations, yields and ticks.

The core takes messages whose signatures the daemon checked, so these are built directly."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from p2pexec.errors import ProtocolError
from p2pexec.protocol.matching import REVISION
from p2pexec.protocol.messages import Message
from p2pexec.protocol.resources import Need, Resources
from p2pexec.protocol.sharing import OFFER_HOLD
from p2pexec.protocol.unusable import DECLINE_EVERY
from p2pexec.worker.decisions import NEWS, POKE, Decline, Offer, WorkerCore
from p2pexec.worker.lease_decisions import BATCH_MOST, IDLE_GRACE, LeaseDecisions

GiB = 1 << 30
PY = "3.12"
_ids = itertools.count()


def message(mtype: str, sender: str, body: dict, exp: float = 1e9) -> Message:
    return Message(mtype, sender, b"k", "alice/friends", f"m{next(_ids)}", 0.0, exp, body)


def request(sender: str = "bob", n: int = 1, req: str = "r1", client: str | None = None, exp: float = 1e9,
            **body) -> Message:
    return message("request", sender, {"req": req, "n": n, "py": PY, "rev": REVISION, "client": client or f"c-{req}",
                                       **body}, exp)


def accept(offer: Offer, slots: int | None = None, sender: str | None = None, worker: str = "w") -> Message:
    return message("accept", sender or offer.client, {"offer": offer.id, "worker": worker, "req": offer.req,
                                                      "kx": "", "slots": offer.slots if slots is None else slots})


def core(slots: int = 2, memory: int = 4 * GiB, cores: int = 4, **kw) -> WorkerCore:
    return WorkerCore(Resources(slots, cores, memory), me="w", python=PY, name="w", **kw)


def offers(actions) -> list[Offer]:
    return [a for a in actions if isinstance(a, Offer)]


def test_a_request_of_another_release_is_declined_and_one_of_ours_is_offered_to():
    w = core()
    older = request("bob", req="r1")
    del older.body["rev"]  # releases before the field was sent
    assert [a.why for a in w.request(older, 0.0)] == ["version"]
    assert [a.why for a in w.request(request("bob", req="r2", rev=REVISION + 1), 0.0)] == ["version"]
    assert [a.why for a in w.request(request("bob", req="r3", rev=True), 0.0)] == ["version"]
    assert offers(w.request(request("bob", req="r4"), 0.0))


def test_a_request_it_cannot_serve_is_declined_and_says_why_at_most_every_so_often():
    w = core(allow=frozenset({"bob"}), requires_unmet=lambda need: "numpy>=9 (to fix: ...)" if need.requires else None)
    [no] = w.request(request("carol"), now=0.0)
    assert isinstance(no, Decline) and no.why == "worker-allow"
    assert w.request(request("carol"), now=DECLINE_EVERY / 2) == []  # (each request at most every DECLINE_EVERY)
    assert w.request(request("bob", req="r2", py="3.7"), 0.0)[0].why == "python"
    assert w.request(request("bob", req="r3", need={"gpus": 1}), 0.0)[0].why == "resources"
    assert w.request(request("bob", req="r4", need={"requires": ["numpy>=9"]}), 0.0)[0].detail.startswith("numpy")
    assert w.request(request("bob", req="r5", need="garbled"), 0.0) == []  # ignored: nothing to say to it
    assert not w.offers and not w.sharing.waiting


def test_a_probe_is_offered_what_is_free_and_holds_nothing():
    w = core(slots=3)
    [offer] = w.request(request(n=8, probe=True), now=0.0)
    assert offer.slots == 3 and offer.party is None
    assert w.sharing.offered_slots(0.0) == 0 and not w.sharing.waiting
    assert w.request(request(req="r2", n=1, probe=True), now=0.0)[0].slots == 1  # at most what it asked


def test_requests_wait_while_a_relay_is_joined_then_are_offered_to():
    w = core()
    w.joining = 1
    assert POKE in w.request(request(n=2), now=0.0) and not w.offers
    w.joining = 0
    [offer] = offers(w.look_again(now=0.0))
    assert offer.slots == 2 and w.sharing.offered_slots(0.0) == 2


def test_an_offer_holds_its_slots_from_other_requests_for_a_while():
    w = core(slots=1)
    first = offers(w.request(request("bob", req="r1"), now=0.0))
    assert len(first) == 1
    assert offers(w.request(request("carol", req="r2"), now=1.0)) == []  # bob's offer holds the slot
    [second] = offers(w.look_again(now=OFFER_HOLD + 0.1))  # not taken: carol gets an offer
    assert second.client == "carol"


def test_an_accept_becomes_a_lease_once_and_only_for_its_offer_sender_and_worker():
    w = core(slots=2)
    [offer] = offers(w.request(request("bob", n=2), now=0.0))
    for bad in (accept(offer, sender="carol"), accept(offer, worker="v"),
                message("accept", "bob", {"offer": "nope", "worker": "w", "req": "r1", "kx": "", "slots": 1})):
        with pytest.raises(ProtocolError):
            w.admit(bad, now=1.0)
    grant = w.admit(accept(offer, slots=5), now=1.0)
    assert grant is not None and grant.slots == (0, 1) and w.reservations.busy == {0, 1}
    with pytest.raises(ProtocolError):
        w.admit(accept(offer), now=1.0)  # an offer opens one lease
    assert offers(w.lease_ended(offer.id, now=2.0)) == [] and not w.reservations.busy


def test_an_accept_may_ask_that_each_task_process_take_a_number_of_tasks_and_no_other_thing():
    """max_tasks_per_child: a client's number, checked (an int of 1 or more), or no limit."""
    for recycle in (0, -1, 2.5, "3", True, [1]):
        w = core(slots=2)
        [offer] = offers(w.request(request("bob"), now=0.0))
        bad = message("accept", "bob", {**accept(offer).body, "recycle": recycle})
        with pytest.raises(ProtocolError, match="max_tasks_per_child"):
            w.admit(bad, now=1.0)
    w = core(slots=2)
    [offer] = offers(w.request(request("bob", req="good"), now=0.0))
    grant = w.admit(message("accept", "bob", {**accept(offer).body, "recycle": 3}), now=1.0)
    assert grant is not None and grant.recycle == 3
    lease = LeaseDecisions(w, offer.id, "bob", "good", list(grant.slots), 30.0, clock=1.0, recycle=grant.recycle)
    _ran(lease, [0.0001] * 16)
    assert lease.batch_size(waiting=40, taken=0) == 3 and lease.batch_size(waiting=40, taken=2) == 1
    assert not lease.retires(2) and lease.retires(3)
    unlimited = lease_of(w, "carol", 1, now=2.0)
    _ran(unlimited, [0.0001] * 16)
    assert unlimited.batch_size(waiting=40, taken=1000) == BATCH_MOST and not unlimited.retires(10**9)


def test_an_accept_whose_slots_went_to_another_accept_opens_nothing():
    w = core(slots=1)
    [first] = offers(w.request(request("bob", req="r1"), now=0.0))
    [late] = offers(w.request(request("carol", req="r2"), now=OFFER_HOLD + 1))  # bob's hold is over
    assert w.admit(accept(late), now=OFFER_HOLD + 2) is not None
    assert w.admit(accept(first), now=OFFER_HOLD + 2) is None  # a race, not an attack


def test_a_draining_worker_offers_nothing_and_takes_no_lease():
    w = core()
    [offer] = offers(w.request(request(), now=0.0))
    assert w.drain() == [POKE] and w.drained
    assert not offers(w.request(request(req="r2"), now=0.0))
    with pytest.raises(ProtocolError):
        w.admit(accept(offer), now=0.0)


def lease_of(w: WorkerCore, sender: str, n: int, now: float, req: str | None = None) -> LeaseDecisions:
    req = req or f"r-{sender}"
    [offer] = offers(w.request(request(sender, n=n, req=req), now=now))
    grant = w.admit(accept(offer), now=now)
    assert grant is not None
    return LeaseDecisions(w, offer.id, sender, req, list(grant.slots), 30.0, clock=now)


def test_a_slot_leaves_a_lease_between_two_tasks_for_a_member_who_holds_none():
    w = core(slots=2)
    lease = lease_of(w, "bob", 2, now=0.0)
    assert lease.leaves(0, now=1.0) is None  # nobody waits
    actions = w.request(request("carol", req="rc"), now=1.0)
    assert POKE in actions and not offers(actions)  # no slot free: the lease is poked
    member, actions = lease.leaves(0, now=1.0)
    assert member == "carol" and [(o.client, o.slots) for o in offers(actions)] == [("carol", 1)]
    assert lease.slots == [1] and w.reservations.busy == {1} and lease.ledger.slots == 1
    assert lease.leaves(1, now=1.0) is None  # the last slot stays; the lease gives way instead


def test_a_lease_that_gives_way_hands_back_what_has_not_started_and_ends_once_answered():
    w = core(slots=1)
    lease = lease_of(w, "bob", 1, now=0.0)
    first = lease.mail(clock=0.0, now=0.0)
    assert first.credit == 1 and not first.end  # the initial credit
    assert lease.task_received(1) and lease.task_started(1)
    lease.task_answered(1, 0.001, clock=0.1)
    lease.mail(clock=0.1, now=0.1)  # short tasks: more credit, some to queue
    for task in (2, 3):
        assert lease.task_received(task)
    assert lease.task_started(2)
    w.request(request("carol", req="rc"), now=20.0)  # carol holds none: bob's only slot is owed to her
    mail = lease.mail(clock=20.0, now=20.0)
    assert mail.returned == [3] and not mail.end and mail.credit == 0  # task 2 still runs
    lease.task_answered(2, 0.001, clock=20.1)
    assert lease.mail(clock=20.1, now=20.1).end


def _ran(lease: LeaseDecisions, durations: list[float]) -> None:
    """``lease`` ran tasks that measured ``durations``, one after another."""
    for seconds in durations:
        task = lease.ledger.received + 1
        lease.ledger.granted = max(lease.ledger.granted, task)
        assert lease.task_received(task) and lease.task_started(task)
        lease.task_answered(task, seconds, clock=1.0)


def test_a_short_task_that_waited_for_a_cpu_does_not_stop_short_tasks_going_together():
    w = core(slots=1)
    lease = lease_of(w, "bob", 1, now=0.0)
    _ran(lease, [0.0001] * 15)
    assert lease.batch_size(waiting=20) == BATCH_MOST
    _ran(lease, [0.02])  # its process was descheduled: it measured 20 ms (an average would say 1.3 ms now)
    assert lease.batch_size(waiting=20) == BATCH_MOST and lease.ledger.mean_seconds < 0.001
    _ran(lease, [0.0001, 0.02, 0.0001, 0.02])  # but tasks that are often long are long
    assert lease.batch_size(waiting=20) == 1


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 10), min_size=1, max_size=40))
def test_a_tasks_typical_duration_is_a_mean_of_recent_ones_that_leaves_out_only_the_longest(durations):
    w = core(slots=1)
    lease = lease_of(w, "bob", 1, now=0.0)
    _ran(lease, durations)
    recent = sorted(durations[-16:])
    mean = lease.ledger.mean_seconds
    assert recent[0] <= mean * (1 + 1e-9) and mean <= recent[len(recent) - len(recent) // 8 - 1] * (1 + 1e-9)
    if len(recent) < 8:  # too few to tell an outlier: the plain mean
        assert mean == pytest.approx(sum(recent) / len(recent))


def test_withdraw_cancels_a_queued_task_interrupt_stops_a_running_one_and_neither_answers_twice():
    w = core(slots=1)
    lease = lease_of(w, "bob", 1, now=0.0)
    lease.ledger.granted = 4
    for task in (1, 2):
        lease.task_received(task)
    assert lease.task_started(1)
    assert lease.cancel(2, interrupt=False) == "cancelled" and not lease.task_started(2)
    assert lease.cancel(1, interrupt=False) is None  # WITHDRAW does not stop a running task
    assert lease.cancel(1, interrupt=True) == "interrupt"
    lease.task_answered(1, None, clock=1.0)
    assert lease.cancel(1, interrupt=True) is None and lease.ledger.answered == lease.ledger.received == 2


def test_an_idle_lease_ends_when_someone_else_waits():
    w = core(slots=1)
    lease = lease_of(w, "bob", 1, now=0.0)
    lease.mail(clock=0.0, now=0.0)
    lease.task_received(1)
    lease.task_started(1)
    assert lease.task_answered(1, 0.2, clock=1.0)  # nothing queued: the daemon looks again after IDLE_GRACE
    assert not lease.mail(clock=1.0 + IDLE_GRACE, now=1.0).end  # nobody waits
    w.request(request("bob", req="r-other"), now=1.0)  # another need of bob's, not owed a slot yet
    assert lease.mail(clock=1.0 + IDLE_GRACE, now=1.0).end


def test_a_task_sent_to_a_stopping_worker_goes_back():
    w = core(slots=1)
    lease = lease_of(w, "bob", 1, now=0.0)
    lease.mail(clock=0.0, now=0.0)
    w.drain()
    assert not lease.task_received(1) and lease.ledger.answered == 1
    mail = lease.mail(clock=0.0, now=0.0)
    assert mail.end and mail.credit == 0


# -- the state machine

MEMBERS = ("bob", "carol", "dave")
NEEDS = {"any": None, "1g": {"memory": GiB}, "2cores": {"cores": 2}}


class _Lease:
    """The model of one lease: what its client may send, what each slot runs, what was answered."""

    def __init__(self, decisions: LeaseDecisions, need: Need) -> None:
        self.decisions = decisions
        self.need = need
        self.credit = 0
        self.queue: list[int] = []  # sent, in order (the memory channel)
        self.running: dict[int, int | None] = dict.fromkeys(decisions.slots)  # slot -> task id
        self.client_ended = False


class WorkerCoreMachine(RuleBasedStateMachine):
    """Any order of board messages, accepts, tasks, cancellations, yields and ticks keeps the books: no slot
    held twice, no more memory or cores than lent, no offer past the free slots, every task answered once."""

    SLOTS = 3

    def __init__(self) -> None:
        super().__init__()
        ids = itertools.count()
        self.core = WorkerCore(Resources(self.SLOTS, 4, 3 * GiB), me="w", python=PY, name="w",
                               new_id=lambda: f"o{next(ids):04}")  # (random ids would make examples irreproducible)
        self.now = 1_000.0
        self.offers: dict[str, Offer] = {}
        self.leases: dict[str, _Lease] = {}
        self.tasks = itertools.count(1)
        self.answered: set[int] = set()
        self.started: set[int] = set()

    # helpers
    def _carry_out(self, actions, owed: int = 0) -> None:
        """Offers that hold slots hold no more than are free and not promised to other offers; ``owed``: one
        of them is the slot a lease just gave up, which goes to who it is owed whatever else was promised.
        (Only when made: an offer stays good for OFFER_TTL, past its hold or a withdraw, and its accept then
        takes what is free, if anything.)"""
        new = offers(actions)
        for offer in new:
            assert offer.slots >= 1 and offer.exp > self.now
            self.offers[offer.id] = offer
        held = sum(o.slots for o in new if o.party is not None)
        if held:
            assert not self.core.draining
            free = self.SLOTS - len(self.core.reservations.busy)
            others = self.core.sharing.offered_slots(self.now) - held
            assert held - owed <= max(0, free - others - owed)
        assert actions.count(NEWS) <= 1

    def _answer(self, task: int) -> None:
        assert task not in self.answered, f"task {task} answered twice"
        self.answered.add(task)

    def _lease(self, data) -> _Lease:
        return self.leases[data.draw(st.sampled_from(sorted(self.leases)))]

    def _close(self, lease: _Lease) -> None:
        del self.leases[lease.decisions.lease]
        self._carry_out(self.core.lease_ended(lease.decisions.lease, self.now))

    # the board
    @rule(member=st.sampled_from(MEMBERS), client=st.integers(0, 1), n=st.integers(1, 4),
          need=st.sampled_from(sorted(NEEDS)), probe=st.booleans(), ttl=st.floats(1, 30))
    def request(self, member, client, n, need, probe, ttl):
        body = {"need": NEEDS[need]} if NEEDS[need] else {}
        if probe:
            body["probe"] = True
        free = self.core.reservations.available(Need.from_json(NEEDS[need]) if NEEDS[need] else Need())
        msg = request(member, n=n, req=f"r-{member}-{client}-{need}", client=f"{member}-{client}",
                      exp=self.now + ttl, **body)
        actions = self.core.request(msg, self.now)
        if probe:
            assert sum(o.slots for o in offers(actions)) <= min(free, n)
        self._carry_out(actions)

    @rule(member=st.sampled_from(MEMBERS), client=st.integers(0, 1), need=st.sampled_from(sorted(NEEDS)))
    def withdraw(self, member, client, need):
        req = f"r-{member}-{client}-{need}"
        self._carry_out(self.core.withdraw(req, member, self.now))
        assert req not in self.core.sharing.waiting

    @rule(step=st.sampled_from((0.1, 1.0, OFFER_HOLD, 10.0)))
    def tick(self, step):
        self.now += step
        self.core.tick(self.now)
        self.offers = {k: o for k, o in self.offers.items() if o.exp > self.now}
        assert set(self.core.offers) <= set(self.offers)
        self._carry_out(self.core.look_again(self.now))

    @rule(rare=st.integers(0, 9))
    def drain(self, rare):
        if rare:
            return  # (a worker drains once, at its end: let most examples run long without)
        assert self.core.drain() == [POKE]
        assert not self.core.offers

    # leases
    @precondition(lambda self: self.offers)
    @rule(data=st.data(), slots=st.integers(1, 4), forged=st.booleans())
    def accept(self, data, slots, forged):
        offer = self.offers[data.draw(st.sampled_from(sorted(self.offers)))]
        before = len(self.core.reservations.busy)
        msg = accept(offer, slots, sender="mallory" if forged else None)
        if forged or self.core.draining or offer.id not in self.core.offers:
            with pytest.raises(ProtocolError):
                self.core.admit(msg, self.now)
            return
        del self.offers[offer.id]
        grant = self.core.admit(msg, self.now)
        if grant is None:
            return
        assert 1 <= len(grant.slots) <= min(slots, offer.slots)
        assert len(self.core.reservations.busy) == before + len(grant.slots)
        decisions = LeaseDecisions(self.core, offer.id, offer.client, offer.req, list(grant.slots), 30.0, self.now)
        self.leases[offer.id] = lease = _Lease(decisions, offer.need)
        self._mail(lease)  # the first message carries the initial credit

    def _mail(self, lease: _Lease) -> None:
        d = lease.decisions
        was_giving_way = d.gave_way
        mail = d.mail(self.now, self.now)
        for task in mail.returned:
            self._answer(task)
        if self.core.draining or was_giving_way:
            assert mail.credit == 0
        if self.core.draining or d.gave_way:
            assert not d.ledger.queued  # what has not started goes back at once
        lease.credit += mail.credit
        if mail.end:
            assert not d.ledger.running and not d.ledger.queued and d.ledger.answered == d.ledger.received
            self._close(lease)

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def mail(self, data):
        """The lease's sender writes a message: hand-backs, then END or credit."""
        self._mail(self._lease(data))

    @precondition(lambda self: any(l.credit and not l.client_ended for l in self.leases.values()))
    @rule(data=st.data())
    def send_tasks(self, data):
        lease = self.leases[data.draw(st.sampled_from(sorted(
            k for k, l in self.leases.items() if l.credit and not l.client_ended)))]
        for _ in range(data.draw(st.integers(1, lease.credit))):
            task = next(self.tasks)
            lease.credit -= 1
            if lease.decisions.task_received(task):
                lease.queue.append(task)
            else:
                assert self.core.draining
                self._answer(task)  # RETURNED

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def slots_turn(self, data):
        """The idle slots of a lease, between two tasks: each leaves the lease, or takes the next task that
        was not withdrawn (as the memory channel wakes them)."""
        lease = self._lease(data)
        for slot in data.draw(st.permutations(sorted(s for s, t in lease.running.items() if t is None))):
            self._turn(lease, slot)

    def _turn(self, lease: _Lease, slot: int) -> None:
        d = lease.decisions
        owed = None if d.finished or len(d.slots) < 2 else self.core.owed(d.lease, self.now)
        given = d.leaves(slot, self.now)
        assert (given is None) == (owed is None)  # a slot leaves exactly when the sharing policy owes one
        if given is not None:
            member, actions = given
            assert owed is not None and member == owed.party.member and slot not in d.slots
            del lease.running[slot]
            assert any(o.req == owed.req for o in offers(actions))  # the freed slot goes to who it is owed
            self._carry_out(actions, owed=1)
            return
        while lease.queue:
            task = lease.queue.pop(0)
            if d.task_started(task):
                assert task not in self.started and task not in self.answered, f"task {task} run twice"
                self.started.add(task)
                lease.running[slot] = task
                return

    @precondition(lambda self: any(t is not None for l in self.leases.values() for t in l.running.values()))
    @rule(data=st.data(), seconds=st.sampled_from((None, 0.0005, 0.05, 2.0)))
    def task_done(self, data, seconds):
        lease = self.leases[data.draw(st.sampled_from(sorted(
            k for k, l in self.leases.items() if any(t is not None for t in l.running.values()))))]
        slot = data.draw(st.sampled_from(sorted(s for s, t in lease.running.items() if t is not None)))
        task, lease.running[slot] = lease.running[slot], None
        assert task is not None
        lease.decisions.task_answered(task, seconds, self.now)
        self._answer(task)

    @precondition(lambda self: self.leases)
    @rule(data=st.data(), interrupt=st.booleans())
    def cancel(self, data, interrupt):
        lease = self._lease(data)
        sent = lease.queue + [t for t in lease.running.values() if t is not None]
        if not sent:
            return
        task = data.draw(st.sampled_from(sent))
        verdict = lease.decisions.cancel(task, interrupt)
        event(f"cancel: {verdict}, interrupt={interrupt}")
        if task in self.answered:
            assert verdict is None
        elif verdict == "cancelled":
            assert task in lease.queue and task not in self.started
            self._answer(task)
        elif verdict == "interrupt":
            assert interrupt and task in lease.running.values()  # its end answers it (task_done)
        else:
            assert not interrupt and task in lease.running.values()

    @precondition(lambda self: any(not l.client_ended for l in self.leases.values()))
    @rule(data=st.data())
    def client_ends(self, data):
        lease = self.leases[data.draw(st.sampled_from(sorted(k for k, l in self.leases.items() if not l.client_ended)))]
        lease.client_ended = True

    @precondition(lambda self: any(l.client_ended and not l.decisions.ledger.queued
                                   and not l.decisions.ledger.running for l in self.leases.values()))
    @rule(data=st.data())
    def wind_up(self, data):
        """The client sent END and the slots finished what they held: the lease ends."""
        lease = self.leases[data.draw(st.sampled_from(sorted(
            k for k, l in self.leases.items()
            if l.client_ended and not l.decisions.ledger.queued and not l.decisions.ledger.running)))]
        lease.decisions.finished = True
        assert lease.decisions.mail(self.now, self.now).end
        self._close(lease)

    @precondition(lambda self: self.leases)
    @rule(data=st.data(), rare=st.integers(0, 4))
    def broken(self, data, rare):
        """The stream broke: its tasks are the client's to run elsewhere; its slots come back."""
        if not rare:
            self._close(self._lease(data))

    # invariants
    @invariant()
    def no_slot_is_held_twice_nor_memory_or_cores_over_reserved(self):
        held = [s for l in self.leases.values() for s in l.decisions.slots]
        assert len(held) == len(set(held)) and set(held) == self.core.reservations.busy
        assert len(held) <= self.SLOTS
        res, reservations = self.core.resources, self.core.reservations
        assert sum(len(l.decisions.slots) * reservations.memory_of(l.need) for l in self.leases.values()) \
            <= res.memory
        assert sum(len(l.decisions.slots) * (l.need.cores or 1) for l in self.leases.values()) \
            <= max(res.cores, res.slots)

    @invariant()
    def each_slot_runs_one_task_and_each_task_is_counted(self):
        for lease in self.leases.values():
            d, ledger = lease.decisions, lease.decisions.ledger
            assert set(lease.running) == set(d.slots) and d.ledger.slots == len(d.slots)
            assert ledger.running == {t for t in lease.running.values() if t is not None}
            assert ledger.queued <= set(lease.queue)
            assert ledger.received == ledger.answered + len(ledger.queued) + len(ledger.running)

    @invariant()
    def a_drained_worker_holds_nothing(self):
        assert self.core.drained == (self.core.draining and not self.leases)


TestWorkerCoreMachine = WorkerCoreMachine.TestCase
TestWorkerCoreMachine.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
