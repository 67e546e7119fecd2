"""The libp2p port's admission rules (p2pexec.transport.admission), with no network."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from p2pexec.transport.admission import Admission, Limits, Pool, Refused, Reporter, Stage, Ticket
from p2pexec.protocol.sources import source_of


def test_sources_are_ipv4_addresses_and_ipv6_slash_64s():
    assert source_of("203.0.113.7") == "203.0.113.7"
    assert source_of("::ffff:203.0.113.7") == "203.0.113.7"
    assert source_of("2001:db8:1:2:aaaa::1") == source_of("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert source_of("2001:db8:1:3::1") != source_of("2001:db8:1:2::1")
    assert source_of("fe80::1%eth0") == "fe80::/64"
    with pytest.raises(ValueError):
        source_of("/p2p-circuit")


def test_one_address_cannot_take_more_than_its_share():
    adm = Admission(Limits(per_source=3, strangers=10, reserve=2))
    held = [adm.open("10.0.0.2", 0.0) for _ in range(3)]
    assert all(isinstance(t, Ticket) for t in held)
    assert adm.open("10.0.0.2", 0.0) == Refused("10.0.0.2", "source")
    assert isinstance(adm.open("10.0.0.3", 0.0), Ticket)  # another address still gets in
    adm.close(held[0])  # type: ignore[arg-type]
    assert isinstance(adm.open("10.0.0.2", 0.0), Ticket)


def test_members_addresses_use_the_reserve_when_strangers_filled_the_pool():
    adm = Admission(Limits(per_source=1, strangers=2, reserve=1))
    member = adm.open("10.0.0.9", 0.0)
    assert isinstance(member, Ticket) and adm.handshaken(member, 0.0) is False
    adm.proved(member, 0.0)
    adm.close(member)
    assert [isinstance(adm.open(f"10.0.1.{i}", 1.0), Ticket) for i in range(3)] == [True, True, False]
    again = adm.open("10.0.0.9", 2.0)
    assert isinstance(again, Ticket) and again.pool is Pool.RESERVE
    assert adm.open("10.0.0.9", 2.0) == Refused("10.0.0.9", "source")  # the reserve is full too
    assert adm.open("10.0.2.1", 2.0) == Refused("10.0.2.1", "full")


def test_members_addresses_are_forgotten_after_a_while_and_beyond_a_count():
    adm = Admission(Limits(strangers=1, reserve=4, remember_seconds=100, remember_at_most=2))
    for i, ip in enumerate(["10.0.0.1", "10.0.0.2", "10.0.0.3"]):
        adm.remember(ip, float(i))
    assert adm.members == 2 and not adm.is_member("10.0.0.1", 3.0)  # the oldest went first
    assert adm.is_member("10.0.0.3", 101.0) and not adm.is_member("10.0.0.2", 101.5)


def test_deadlines_handshake_then_proof():
    adm = Admission(Limits(handshake_seconds=5, prove_seconds=15))
    ticket = adm.open("10.0.0.2", 100.0)
    assert isinstance(ticket, Ticket) and ticket.deadline == 105.0
    assert adm.handshaken(ticket, 101.0) is True and ticket.deadline == 116.0 and ticket.stage is Stage.PROVING
    adm.expired(ticket)
    adm.close(ticket)
    assert adm.dropped == Counter({Stage.PROVING: 1}) and not adm.unproven and not +adm.in_pool
    with pytest.raises(RuntimeError):
        adm.handshaken(ticket, 102.0)  # our bug, not the peer's


def test_reporter_says_what_is_new_at_most_every_period():
    adm, rep = Admission(Limits(per_source=1)), Reporter(every=10)
    assert rep.due(adm, 0.0) is None
    adm.open("10.0.0.2", 0.0)
    for _ in range(5):
        adm.open("10.0.0.2", 0.0)
    assert rep.due(adm, 0.0) == {"refused (source)": 5}
    adm.open("10.0.0.2", 1.0)
    assert rep.due(adm, 1.0) is None  # too soon
    assert rep.due(adm, 10.5) == {"refused (source)": 1}


@given(st.lists(st.sampled_from(["10.0.0.1", "10.0.0.2", "2001:db8::1", "2001:db8::2", "2001:db8:0:1::1"]),
                max_size=60))
def test_no_source_ever_holds_more_than_its_share_of_the_strangers_pool(ips):
    limits = Limits(per_source=3, strangers=8, reserve=0)
    adm = Admission(limits)
    admitted = Counter(t.source for ip in ips if isinstance(t := adm.open(ip, 0.0), Ticket))
    assert all(n <= limits.per_source for n in admitted.values())
    assert sum(admitted.values()) <= limits.strangers
    assert sum(admitted.values()) + sum(adm.refused.values()) == len(ips)


class AdmissionMachine(RuleBasedStateMachine):
    """Any interleaving of connections opening, handshaking, proving, expiring and closing keeps the books."""

    tickets = Bundle("tickets")

    def __init__(self) -> None:
        super().__init__()
        self.limits = Limits(per_source=2, strangers=4, reserve=2, handshake_seconds=1, prove_seconds=2,
                             remember_seconds=50, remember_at_most=3)
        self.adm = Admission(self.limits)
        self.now = 0.0
        self.live: dict[int, Ticket] = {}

    @rule(target=tickets, ip=st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "2001:db8::1"]))
    def open(self, ip):
        was_member = self.adm.is_member(source_of(ip), self.now)
        verdict = self.adm.open(ip, self.now)
        if isinstance(verdict, Refused):
            return None
        assert verdict.pool is Pool.STRANGERS or was_member  # strangers never touch the reserve
        self.live[verdict.id] = verdict
        return verdict

    @rule(ticket=tickets)
    def handshake(self, ticket):
        if ticket is not None and ticket.stage is Stage.HANDSHAKE and ticket.id in self.live:
            assert self.adm.handshaken(ticket, self.now) is True
            assert ticket.deadline == self.now + self.limits.prove_seconds

    @rule(ticket=tickets)
    def prove(self, ticket):
        if ticket is not None and ticket.stage is Stage.PROVING and ticket.id in self.live:
            self.adm.proved(ticket, self.now)
            assert self.adm.is_member(ticket.source, self.now)

    @rule(ticket=consumes(tickets), expire=st.booleans())
    def close(self, ticket, expire):
        if ticket is not None:
            if expire:
                self.adm.expired(ticket)
            self.adm.close(ticket)
            self.adm.close(ticket)  # idempotent
            self.live.pop(ticket.id, None)

    @rule(dt=st.floats(0, 30))
    def wait(self, dt):
        self.now += dt

    @invariant()
    def books_balance(self):
        unsettled = [t for t in self.live.values() if t.stage is not Stage.SETTLED]
        assert self.adm.unproven == Counter(t.source for t in unsettled)
        assert 0 not in self.adm.unproven.values()
        assert self.adm.in_pool[Pool.STRANGERS] == sum(t.pool is Pool.STRANGERS for t in unsettled)
        assert self.adm.in_pool[Pool.RESERVE] == sum(t.pool is Pool.RESERVE for t in unsettled)
        assert self.adm.in_pool[Pool.STRANGERS] <= self.limits.strangers
        assert self.adm.in_pool[Pool.RESERVE] <= self.limits.reserve
        strangers = Counter(t.source for t in unsettled if t.pool is Pool.STRANGERS)
        assert all(n <= self.limits.per_source for n in strangers.values())
        assert self.adm.members <= self.limits.remember_at_most


AdmissionMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestAdmissionMachine = AdmissionMachine.TestCase
