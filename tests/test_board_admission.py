"""The board's admission rules (pure): per-source limits, the members' reserve, deadlines."""

from __future__ import annotations

import math

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from p2pexec.board.admission import Admission, Limits, LogLimiter, Stage
from p2pexec.protocol.sources import source_of

LIMITS = Limits(max_connections=12, max_unauthenticated=8, connections_per_source=6,
                unauthenticated_per_source=4, handshakes_per_source=2, handshake_timeout=10, auth_timeout=20)
HOSTS = ["127.0.0.2", "127.0.0.3", "10.0.0.1", "2001:db8::1", "2001:db8::2", "2001:db8:0:1::1", "::ffff:10.0.0.1"]


def test_sources_are_addresses_and_ipv6_64s():
    assert source_of("2001:db8::1") == source_of("2001:db8::ffff:1") == "2001:db8::/64"
    assert source_of("2001:db8:0:1::1") != source_of("2001:db8::1")
    assert source_of("::ffff:10.0.0.1") == source_of("10.0.0.1") == "10.0.0.1"
    assert source_of("fe80::1%eth0") == "fe80::/64"


def test_one_source_fills_only_its_own_share():
    adm = Admission(LIMITS)
    verdicts = [adm.connect(i, "127.0.0.2", 0.0) for i in range(10)]
    assert verdicts == [None, None] + ["handshakes-per-source"] * 8
    assert adm.connect("member", "127.0.0.1", 0.0) is None
    adm.handshaken(0)
    adm.handshaken(1)
    assert [adm.connect(i, "127.0.0.2", 0.0) for i in (10, 11, 12)] == [None, None, "unauthenticated-per-source"]


def test_members_keep_their_reserve():
    adm = Admission(LIMITS)
    for i in range(8):  # four sources, two strangers each: all the unauthenticated room
        assert adm.connect(i, f"127.0.0.{2 + i // 2}", 0.0) is None
    assert adm.connect("late", "127.0.0.9", 0.0) == "max-unauthenticated"
    adm.authenticated(0)  # a member, once logged in, frees a stranger's place
    assert adm.connect("next", "127.0.0.9", 0.0) is None
    assert adm.counts() == {"total": 9, "unauthenticated": 8, "handshakes": 8}


def test_deadlines_close_strangers_only():
    adm = Admission(LIMITS)
    for conn in ("silent", "shook", "member"):
        assert adm.connect(conn, "127.0.0.1" if conn == "member" else "127.0.0.2", 0.0) is None
    adm.handshaken("shook")
    adm.handshaken("member")
    adm.authenticated("member")
    assert adm.next_deadline() == 10.0
    assert adm.tick(9.9) == []
    assert adm.tick(10.0) == [("silent", "handshake-timeout")]
    assert adm.next_deadline() == 20.0
    assert adm.tick(20.0) == [("shook", "auth-timeout")]
    assert adm.next_deadline() == math.inf and adm.stage("member") is Stage.AUTHENTICATED


def test_limits_must_make_sense():
    with pytest.raises(ValueError):
        Limits(max_connections=10, max_unauthenticated=11)
    with pytest.raises(ValueError):
        Limits(handshake_timeout=0)
    assert Limits(max_connections=100).unauthenticated_cap == 75


def test_log_limiter_speaks_once_per_interval_with_the_count():
    limiter = LogLimiter(interval=60)
    assert [limiter.hit("a", t) for t in (0, 1, 2, 59)] == [1, 0, 0, 0]
    assert limiter.hit("b", 3) == 1  # each reason on its own
    assert limiter.hit("a", 60) == 4


class AdmissionMachine(RuleBasedStateMachine):
    """Random connects, key exchanges, logins, hang-ups and clock steps against a model of each connection."""

    def __init__(self) -> None:
        super().__init__()
        self.adm = Admission(LIMITS)
        self.now = 0.0
        self.serial = 0
        self.open: dict[int, tuple[str, float, Stage]] = {}  # conn -> (host, accepted at, stage as reported)

    @rule(host=st.sampled_from(HOSTS))
    def connect(self, host):
        self.serial += 1
        before = self.adm.counts()
        if self.adm.connect(self.serial, host, self.now) is None:
            self.open[self.serial] = (host, self.now, Stage.HANDSHAKE)
        else:  # refused only when some limit was really reached
            mine = self.adm.counts(host)
            assert (before["total"] >= LIMITS.max_connections
                    or before["unauthenticated"] >= LIMITS.unauthenticated_cap
                    or mine["total"] >= LIMITS.connections_per_source
                    or mine["unauthenticated"] >= LIMITS.unauthenticated_per_source
                    or mine["handshakes"] >= LIMITS.handshakes_per_source)

    @precondition(lambda self: self.open)
    @rule(data=st.data(), event=st.sampled_from(["handshaken", "authenticated", "closed"]))
    def report(self, data, event):
        conn = data.draw(st.sampled_from(sorted(self.open)))
        host, since, stage = self.open[conn]
        getattr(self.adm, event)(conn)
        if event == "closed":
            del self.open[conn]
        elif event == "authenticated" or stage is Stage.HANDSHAKE:
            self.open[conn] = (host, since, Stage.AUTHENTICATED if event == "authenticated" else Stage.UNAUTHENTICATED)

    @rule(step=st.floats(0, 25))
    def tick(self, step):
        self.now += step
        for conn, reason in self.adm.tick(self.now):
            host, since, stage = self.open.pop(conn)
            assert stage is not Stage.AUTHENTICATED
            limit = LIMITS.handshake_timeout if reason == "handshake-timeout" else LIMITS.auth_timeout
            assert self.now >= since + limit  # as the deadline was computed: no rounding between
        for host, since, stage in self.open.values():  # nobody outlives their deadline
            assert stage is Stage.AUTHENTICATED or self.now < since + LIMITS.auth_timeout
            assert stage is not Stage.HANDSHAKE or self.now < since + LIMITS.handshake_timeout

    @invariant()
    def within_limits(self):
        assert self.adm.counts()["total"] == len(self.open) <= LIMITS.max_connections
        assert self.adm.counts()["unauthenticated"] <= LIMITS.unauthenticated_cap
        for host in HOSTS:
            mine = self.adm.counts(host)
            assert mine["total"] <= LIMITS.connections_per_source
            assert mine["handshakes"] <= mine["unauthenticated"] <= LIMITS.unauthenticated_per_source
            assert mine["handshakes"] <= LIMITS.handshakes_per_source
        for conn, (_, _, stage) in self.open.items():
            assert self.adm.stage(conn) is stage


TestAdmission = AdmissionMachine.TestCase
TestAdmission.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)
