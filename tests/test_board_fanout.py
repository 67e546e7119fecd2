"""The board's request fan-out on its own (:mod:`p2pexec.board.fanout`): who gets a request, a withdraw
and a hello, with a hypothesis state machine for the bounds and the rotation."""

from __future__ import annotations

import math

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from p2pexec.board.fanout import MAX_FANOUT, MIN_FANOUT, FanOut


def cluster(workers: int, free: int = 1) -> FanOut:
    f = FanOut()
    for sid in range(1, workers + 1):
        f.joined(sid)
        f.hello(sid, {"role": "worker", "free": free})
    return f


def test_a_request_reaches_a_bounded_number_of_workers_growing_with_the_slots_asked():
    f = cluster(1000)
    assert len(f.request(5000, {"req": "r", "n": 1}, 10, 0.0)) == MIN_FANOUT
    assert len(f.request(5000, {"req": "r", "n": 20}, 10, 0.0)) == 40  # twice the slots asked
    assert len(f.request(5000, {"req": "r", "n": 10_000}, 10, 0.0)) == MAX_FANOUT
    four = cluster(100, free=4)
    assert len(four.request(5000, {"req": "r", "n": 20}, 10, 0.0)) == 10  # 40 free slots in 10 workers
    assert len(cluster(3).request(5000, {"req": "r", "n": 1}, 10, 0.0)) == 3  # all there are


def test_repeated_requests_rotate_over_all_free_workers():
    f = cluster(100)
    seen: set[int] = set()
    for i in range(100 // MIN_FANOUT):
        got = f.request(5000, {"req": "r", "n": 1}, 10, float(i))
        assert not seen & set(got)  # nobody twice before everyone once
        seen |= set(got)
    last = f.request(5000, {"req": "r", "n": 1}, 10, 99.0)
    assert seen | set(last) == set(range(1, 101))
    assert len(set(last) & seen) == MIN_FANOUT - (100 - len(seen))  # then the longest unasked again


def test_free_workers_come_first_and_news_goes_to_the_front():
    f = cluster(20)
    for sid in range(1, 16):
        f.hello(sid, {"role": "worker", "free": 0})
    # 5 free, then the busy ones that said so last (news goes first)
    assert f.request(99, {"req": "a", "n": 4}, 10, 0.0) == [20, 19, 18, 17, 16, 15, 14, 13]
    f.hello(10, {"role": "worker", "free": 2})  # freed: asked first
    assert f.request(99, {"req": "b", "n": 1}, 10, 0.0)[0] == 10
    f.hello(12, {"role": "worker"})  # says nothing of free slots (an older worker): taken as free
    assert 12 in f.free


def test_a_probe_reaches_every_worker_and_the_sender_never_gets_its_own():
    f = cluster(300)
    assert sorted(f.request(7, {"req": "p", "n": 4096, "probe": True}, 10, 0.0)) == [s for s in range(1, 301) if s != 7]
    assert 7 not in f.request(7, {"req": "q", "n": 300}, 10, 0.0)


def test_a_request_reaches_workers_of_its_wire_revision_first():
    """While friends upgrade: an older client's request goes to the older workers (they send no revision), a
    newer one's to the newer, as long as there are enough of them; else the others too, so that the client
    hears of them (they offer; it refuses and says whose worker to upgrade)."""
    f = FanOut()
    for sid in range(1, 21):
        f.joined(sid)
        f.hello(sid, {"role": "worker", "free": 1, **({"rev": 2} if sid <= 10 else {})})
    for _ in range(5):  # (each repeat reaches others: the rotation)
        assert set(f.request(100, {"req": "new", "n": 1, "rev": 2}, 10, 0.0)) <= set(range(1, 11))
        assert set(f.request(101, {"req": "old", "n": 1}, 10, 0.0)) <= set(range(11, 21))
    many = f.request(100, {"req": "many", "n": 6, "rev": 2}, 10, 0.0)  # twice 6 slots: its 10, then 2 others
    assert len(many) == 12 and set(many[:10]) == set(range(1, 11))
    assert len(f.request(100, {"req": "p", "n": 4096, "rev": 2, "probe": True}, 10, 0.0)) == 20
    for sid in range(3, 11):
        f.hello(sid, {"role": "client"})
    reached = f.request(100, {"req": "few", "n": 1, "rev": 2}, 10, 0.0)
    assert len(reached) == MIN_FANOUT and set(reached[:2]) == {1, 2}  # its own first, then the others'



def test_a_withdraw_goes_to_the_workers_its_request_reached_while_it_lives():
    f = cluster(30)
    first = f.request(100, {"req": "r", "n": 1}, 10.0, 0.0)
    again = f.request(100, {"req": "r", "n": 1}, 10.0, 1.0)
    assert not set(first) & set(again)
    f.left(first[0])
    f.hello(first[1], {"role": "client"})  # no longer a worker
    assert f.withdraw(100, "r", 2.0) == sorted(set(first[2:]) | set(again))
    assert f.withdraw(101, "r", 2.0) == []  # another session's request of that id: not this one
    assert f.withdraw(100, "other", 2.0) == []
    assert f.withdraw(100, "r", 1.0 + 10.0 + 60.0) == []  # long expired
    f.left(100)
    assert f.withdraw(100, "r", 2.0) == [] and f.asked() == 0


def test_requests_remembered_are_bounded_per_session():
    f = cluster(10)
    for i in range(1000):
        f.request(100, {"req": f"r{i}", "n": 1}, 10.0, 0.0)
    assert f.asked() == 64


def test_who_gets_a_hello():
    f = FanOut()
    assert f.hello_skips("worker") == {"worker"}
    assert f.hello_skips("client") == {"worker", "client"}
    assert f.hello_skips("observer") == frozenset() and f.hello_skips(None) == frozenset()
    f.hello(1, {"role": "worker"})  # not a receiver (a pub): nothing to remember
    assert f.role(1) is None and not f.free


def test_limits_must_make_sense():
    with pytest.raises(ValueError):
        FanOut(fewest=0)
    with pytest.raises(ValueError):
        FanOut(fewest=5, most=4)


class FanOutMachine(RuleBasedStateMachine):
    """Random joins, leaves, hellos, requests and withdraws against a small fan-out (2 to 3 workers a
    request), checked against the rules: bounded, only workers, free ones first, every free worker
    reached within a bounded number of requests, withdraws exactly to where the request went."""

    @initialize(fewest=st.integers(1, 3), extra=st.integers(0, 2))
    def start(self, fewest: int, extra: int) -> None:
        self.f = FanOut(fewest, fewest + extra)
        self.sessions: dict[int, str | None] = {}  # sid -> role
        self.free: dict[int, int] = {}  # workers -> free slots they said
        self.serial = 0
        self.now = 0.0
        self.asks: dict[tuple[int, str], set[int]] = {}
        self.unreached: dict[int, int] = {}  # free worker -> requests since the free set changed that missed it

    @rule()
    def join(self) -> None:
        self.serial += 1
        self.f.joined(self.serial)
        self.sessions[self.serial] = None

    @precondition(lambda self: self.sessions)
    @rule(data=st.data())
    def leave(self, data) -> None:
        sid = data.draw(st.sampled_from(sorted(self.sessions)))
        self.f.left(sid)
        del self.sessions[sid]
        self.free.pop(sid, None)
        self.asks = {k: v for k, v in self.asks.items() if k[0] != sid}
        self.track()

    @precondition(lambda self: self.sessions)
    @rule(data=st.data(), role=st.sampled_from(("worker", "client", "observer")), free=st.none() | st.integers(0, 3))
    def hello(self, data, role: str, free) -> None:
        sid = data.draw(st.sampled_from(sorted(self.sessions)))
        self.f.hello(sid, {"role": role} if free is None else {"role": role, "free": free})
        self.sessions[sid] = role
        self.free.pop(sid, None)
        if role == "worker" and (free is None or free > 0):
            self.free[sid] = 1 if free is None else free
        assert self.f.role(sid) == role
        self.track()

    def track(self) -> None:
        """The free workers changed: count the requests that miss each from now on."""
        if set(self.unreached) != set(self.free):
            self.unreached = dict.fromkeys(self.free, 0)

    @precondition(lambda self: self.sessions)
    @rule(data=st.data(), n=st.integers(1, 4), req=st.sampled_from(("a", "b")))
    def request(self, data, n: int, req: str) -> None:
        sender = data.draw(st.sampled_from(sorted(self.sessions)))
        self.now += 0.1
        got = self.f.request(sender, {"req": req, "n": n}, 10.0, self.now)
        workers = {s for s, role in self.sessions.items() if role == "worker" and s != sender}
        free = {s for s in self.free if s != sender}
        assert len(got) == len(set(got)) and set(got) <= workers and len(got) <= self.f.most
        if len(workers) <= self.f.fewest:
            assert set(got) == workers
        if set(got) - free:  # busy workers only once every free one is asked
            assert free <= set(got)
        reached = sum(self.free.get(s, 1) for s in got)
        assert len(got) == len(workers) or len(got) == self.f.most or \
            (len(got) >= self.f.fewest and reached >= 2 * n)
        self.asks.setdefault((sender, req), set()).update(got)
        for s in self.unreached:
            self.unreached[s] = 0 if s in got else self.unreached[s] + (s != sender)

    @precondition(lambda self: self.sessions)
    @rule(data=st.data(), req=st.sampled_from(("a", "b", "c")))
    def withdraw(self, data, req: str) -> None:
        sender = data.draw(st.sampled_from(sorted(self.sessions)))
        workers = {s for s, role in self.sessions.items() if role == "worker"}
        expected = (self.asks.get((sender, req), set()) & workers) - {sender}
        assert set(self.f.withdraw(sender, req, self.now)) == expected

    @invariant()
    def every_free_worker_is_reached_within_a_bound(self) -> None:
        # While the free workers stay the same, each request reaches the (at least) ``fewest`` of them
        # that were asked longest ago: none is missed by more than ceil(free workers / fewest) in a row.
        bound = math.ceil(max(1, len(self.free)) / self.f.fewest)
        assert all(count <= bound for count in self.unreached.values()), (self.unreached, bound)

    @invariant()
    def roles_match(self) -> None:
        assert set(self.f.unknown) == {s for s, role in self.sessions.items() if role is None}
        assert dict(self.f.free) == self.free


FanOutMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
test_fan_out_state_machine = FanOutMachine.TestCase
