"""Fair sharing of one worker's slots (pure): who is offered slots, and which lease gives one back."""

from __future__ import annotations

import itertools
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from p2pexec.protocol.sharing import Party, Sharing, Want

ALICE, ALICE2, BOB, CAROL = Party("alice", "a1"), Party("alice", "a2"), Party("bob", "b1"), Party("carol", "c1")
FAR = 1e9


def simulate(slots: int, parties: list[Party], durations: list[float], horizon: float) -> Counter[str]:
    """A worker with ``slots`` slots, every party with an endless queue: slot-seconds per member.

    Each slot runs one task at a time (durations cycle); between two tasks a
    slot that the policy says to give up goes to whoever :meth:`allocate`
    picks, as the daemon does.  Offers are taken at once.
    """
    sharing = Sharing("w", quantum=5.0)
    ids = itertools.count()
    lengths = itertools.cycle(durations)
    used: Counter[str] = Counter()
    holder: list[tuple[str, Party] | None] = [None] * slots  # the lease each slot is in
    free_at = [0.0] * slots
    now = 0.0

    def ask(party: Party) -> None:
        sharing.wait(Want(f"req-{party.client}", party, slots, FAR))

    def fill(now: float) -> None:
        for party in parties:
            ask(party)  # clients with work left ask again (every 2 s in the scheduler)
        empty = [i for i, h in enumerate(holder) if h is None]
        for want, count in sharing.allocate(lambda w: len(empty), now):
            lease = f"lease-{next(ids)}"
            sharing.offered(lease, want, count, now)
            sharing.leased(lease, want.req, want.party, count, now)
            for _ in range(count):
                holder[empty.pop()] = (lease, want.party)

    fill(now)
    while now < horizon:
        slot = min(range(slots), key=lambda i: free_at[i])
        now = free_at[slot]
        held = holder[slot]
        if held is not None:
            lease, party = held
            for p in parties:
                ask(p)
            owed = sharing.owed(lease, now)
            if owed is not None:
                if sum(h is not None and h[0] == lease for h in holder) > 1:
                    sharing.shrunk(lease, now)
                else:  # its last slot: the daemon ends the lease instead
                    sharing.ended(lease, now)
                lease = f"lease-{next(ids)}"
                sharing.offered(lease, owed, 1, now)
                sharing.leased(lease, owed.req, owed.party, 1, now)
                holder[slot] = held = (lease, owed.party)
        if held is None:
            free_at[slot] = now + 0.01
            continue
        length = next(lengths)
        used[held[1].member] += min(length, max(0.0, horizon - now))
        free_at[slot] = now + length
    return used


@settings(max_examples=60, deadline=None)
@given(slots=st.integers(1, 6), members=st.integers(2, 3),
       durations=st.lists(st.floats(0.05, 2.0), min_size=1, max_size=5))
def test_members_with_endless_queues_get_equal_shares(slots, members, durations):
    parties = [ALICE, BOB, CAROL][:members]
    used = simulate(slots, parties, durations, horizon=600.0)
    total = sum(used.values())
    for party in parties:
        assert abs(used[party.member] / total - 1 / members) <= 0.1, used


@settings(max_examples=30, deadline=None)
@given(slots=st.integers(2, 6), durations=st.lists(st.floats(0.05, 2.0), min_size=1, max_size=5))
def test_a_member_shares_with_another_member_before_its_own_clients_split_the_rest(slots, durations):
    used = simulate(slots, [ALICE, ALICE2, BOB], durations, horizon=600.0)
    total = sum(used.values())
    assert abs(used["bob"] / total - 0.5) <= 0.1, used  # per member first: bob is not outnumbered


def test_a_newcomer_is_owed_a_slot_at_once_by_a_lease_with_two_more():
    sharing = Sharing("w")
    sharing.leased("hog", "r-a", ALICE, 2, now=0.0)
    assert not sharing.owed("hog", 0.0)  # nobody waits
    sharing.wait(Want("r-b", BOB, 1, FAR))
    assert sharing.owed("hog", 0.0).party == BOB  # 2 against 0: at the next task boundary
    sharing.shrunk("hog", 0.0)
    [(want, count)] = sharing.allocate(lambda w: 1, 0.0)
    assert (want.party, count) == (BOB, 1)
    sharing.offered("o", want, count, 0.0)
    assert not sharing.owed("hog", 0.0)  # 1 against 1 (the offer holds it)


def test_one_slot_takes_turns_after_the_quantum():
    sharing = Sharing("w", quantum=5.0)
    sharing.leased("a", "r-a", ALICE, 1, now=0.0)
    sharing.wait(Want("r-b", BOB, 1, FAR))
    assert not sharing.owed("a", 4.9)
    assert sharing.owed("a", 5.0)


def test_a_clients_other_needs_do_not_take_its_own_slots():
    sharing = Sharing("w")
    sharing.leased("a", "r-a", ALICE, 3, now=0.0)
    sharing.wait(Want("r-a-gpu", ALICE, 1, FAR))
    assert not sharing.owed("a", 100.0)
    assert sharing.contended("r-a", 0.0)  # (lease_seconds turns them)


def test_an_offer_holds_its_slots_until_taken_lapsed_or_withdrawn():
    sharing = Sharing("w", hold=3.0)
    want = Want("r-b", BOB, 2, FAR)
    sharing.wait(want)
    sharing.offered("o", want, 2, now=0.0)
    assert sharing.offered_slots(1.0) == 2 and sharing.offered_slots(3.0) == 0
    sharing.withdraw("r-b", "mallory")  # not bob's to withdraw
    assert sharing.offered_slots(1.0) == 2
    sharing.withdraw("r-b", "bob")
    assert sharing.offered_slots(1.0) == 0


def test_workers_spread_equal_requests_instead_of_all_offering_to_the_first():
    wants = [Want(f"r{i}", Party(f"m{i}", f"c{i}"), 1, FAR) for i in range(32)]
    firsts = set()
    for name in range(32):
        sharing = Sharing(f"worker-{name}")
        for want in wants:
            sharing.wait(want)
        [(first, _)] = sharing.allocate(lambda w: 1, 0.0)
        firsts.add(first.req)
    assert len(firsts) >= 12  # 32 one-slot workers, 32 equal requests: not a herd on one


def test_a_long_running_worker_forgets_the_clients_it_served_long_ago():
    sharing = Sharing("w")
    for i in range(1000):  # every executor is a client of its own
        want = Want(f"r{i}", Party("alice", f"c{i}"), 1, FAR)
        sharing.wait(want)
        sharing.offered(f"o{i}", want, 1, now=float(i))
        sharing.leased(f"o{i}", want.req, want.party, 1, now=float(i))
        sharing.ended(f"o{i}", now=float(i) + 0.5)
    sharing.expire(now=1500.0)  # 501 s after the last: the last 99 clients and alice are still known
    assert len(sharing._served) == 100 and not sharing._lost  # noqa: SLF001


class SharingRules(RuleBasedStateMachine):
    """Any order of requests, offers, leases, yields and withdrawals keeps the books straight."""

    PARTIES = (ALICE, ALICE2, BOB, CAROL)
    SLOTS = 4

    def __init__(self) -> None:
        super().__init__()
        self.sharing = Sharing("w", quantum=5.0, hold=3.0)
        self.now = 0.0
        self.leases: dict[str, tuple[Party, int]] = {}
        self.ids = itertools.count()

    def _used(self) -> int:
        return sum(n for _, n in self.leases.values()) + self.sharing.offered_slots(self.now)

    @rule(party=st.sampled_from(PARTIES), slots=st.integers(1, 4), ttl=st.floats(1, 20))
    def request(self, party, slots, ttl):
        self.sharing.wait(Want(f"r-{party.client}", party, slots, self.now + ttl))

    @rule(take=st.booleans())
    def offer(self, take):
        free = self.SLOTS - self._used()
        for want, count in self.sharing.allocate(lambda w: free, self.now):
            assert 0 < count
            lease = f"o{next(self.ids)}"
            self.sharing.offered(lease, want, count, self.now)
            if take:
                self.sharing.leased(lease, want.req, want.party, count, self.now)
                self.leases[lease] = (want.party, count)
        assert self._used() <= self.SLOTS

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def boundary(self, data):
        lease = data.draw(st.sampled_from(sorted(self.leases)))
        party, count = self.leases[lease]
        owed = self.sharing.owed(lease, self.now)
        if owed is not None:
            assert owed.party.client != party.client and owed.exp > self.now  # never to its own client
            self.sharing.shrunk(lease, self.now)
            if count == 1:
                del self.leases[lease]
            else:
                self.leases[lease] = (party, count - 1)
            self.sharing.offered(f"o{next(self.ids)}", owed, 1, self.now)  # the freed slot goes to it

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def end(self, data):
        lease = data.draw(st.sampled_from(sorted(self.leases)))
        self.sharing.ended(lease, self.now)
        del self.leases[lease]

    @rule(party=st.sampled_from(PARTIES))
    def withdraw(self, party):
        self.sharing.withdraw(f"r-{party.client}", party.member)
        assert f"r-{party.client}" not in self.sharing.waiting

    @rule(step=st.floats(0, 10))
    def tick(self, step):
        self.now += step
        self.sharing.expire(self.now)

    @invariant()
    def never_more_than_the_worker_has(self):
        assert self._used() <= self.SLOTS


TestSharingRules = SharingRules.TestCase
TestSharingRules.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
