"""The pure rules of reaching peers across NATs: relay tickets, which addresses to announce, dial backoff."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from p2pexec.keys import Identity
from p2pexec.protocol.reach import (
    CIRCUIT, DialBackoff, InvalidTicket, NetView, Reachability, addrs_for, announced_relays, check_ticket,
    make_ticket, scope, split_tcp,
)

NOW = 1_800_000_000.0
ALICE = Identity("alice", SigningKey.generate())
MALLORY = Identity("mallory", SigningKey.generate())
PEER, RELAY = "12D3KooWpeer", "12D3KooWrelay"


def members(user: str, key: bytes) -> bool:
    return user == "alice" and key == ALICE.public_key


def check(raw: bytes, **overrides: object) -> str:
    args: dict = dict(peer=PEER, relay=RELAY, allows=members, now=NOW)
    args.update(overrides)
    return check_ticket(raw, **args)


# -- tickets ---------------------------------------------------------------------------
def test_a_members_ticket_proves_who_it_is():
    assert check(make_ticket(ALICE, PEER, RELAY, NOW)) == "alice"


@pytest.mark.parametrize("change, reason", [
    (dict(peer="12D3KooWother"), "another peer"),
    (dict(relay="12D3KooWotherrelay"), "another relay"),
    (dict(now=NOW + 3600), "expired"),
    (dict(allows=lambda user, key: False), "not a member"),
])
def test_a_ticket_is_refused_elsewhere_later_or_for_non_members(change, reason):
    with pytest.raises(InvalidTicket, match=reason):
        check(make_ticket(ALICE, PEER, RELAY, NOW), **change)


def test_a_stranger_cannot_speak_for_a_member():
    ticket = json.loads(make_ticket(MALLORY, PEER, RELAY, NOW))
    ticket["user"] = "alice"  # mallory's own key and signature, alice's name
    with pytest.raises(InvalidTicket):
        check(json.dumps(ticket).encode())


@given(st.sampled_from(["user", "key", "peer", "relay", "ts", "sig"]), st.text(max_size=20))
@settings(max_examples=60)
def test_any_altered_field_breaks_the_ticket(name, value):
    ticket = json.loads(make_ticket(ALICE, PEER, RELAY, NOW))
    if ticket[name] == value:
        return
    ticket[name] = value
    with pytest.raises(InvalidTicket):
        check(json.dumps(ticket).encode())


@given(st.binary(max_size=300))
def test_garbage_tickets_are_refused_cleanly(raw):
    with pytest.raises(InvalidTicket):
        check(raw)


# -- addresses -------------------------------------------------------------------------
def test_scopes():
    assert scope("127.0.0.1") == "loopback"
    assert [scope(ip) for ip in ("10.0.1.2", "192.168.1.5", "100.64.3.1", "169.254.1.1")] == ["private"] * 4
    assert [scope(ip) for ip in ("198.51.100.1", "8.8.8.8", "192.0.2.2")] == ["public"] * 3
    assert split_tcp("/ip4/10.0.0.1/tcp/80") == ("10.0.0.1", 80)
    assert split_tcp(f"/ip4/1.2.3.4/tcp/1/p2p/R{CIRCUIT}") is None and split_tcp("/ip4/x/tcp/1") is None


LOCAL = ["/ip4/127.0.0.1/tcp/4000", "/ip4/10.0.1.2/tcp/4000"]
CIRC = "/ip4/198.51.100.254/tcp/4001/p2p/R/p2p-circuit"
BEHIND_NAT = Reachability(circuits=(CIRC,), checked=True, public_ip="198.51.100.1")
ME = NetView("net-b", "198.51.100.1")


def test_a_worker_behind_a_nat_gives_strangers_only_its_circuit():
    assert addrs_for(LOCAL, ME, BEHIND_NAT, NetView("net-c", "203.0.113.1")) == [CIRC]


def test_lan_addresses_go_to_peers_behind_the_same_nat_and_loopback_to_the_same_namespace():
    assert addrs_for(LOCAL, ME, BEHIND_NAT, NetView("net-x", "198.51.100.1")) == [LOCAL[1], CIRC]
    assert addrs_for(LOCAL, ME, BEHIND_NAT, NetView("net-b", "198.51.100.1")) == LOCAL


def test_a_reachable_worker_announces_what_was_dialled_back():
    reach = Reachability(public=("/ip4/192.0.2.2/tcp/4000",), checked=True, public_ip="192.0.2.2")
    local = ["/ip4/127.0.0.1/tcp/4000", "/ip4/192.0.2.2/tcp/4000", "/ip4/192.0.2.9/tcp/4000"]
    assert addrs_for(local, NetView("w", "192.0.2.2"), reach, NetView("k", "198.18.0.2")) == [
        "/ip4/192.0.2.2/tcp/4000"]


def test_without_a_relay_everything_but_foreign_loopback_is_offered():
    assert addrs_for(LOCAL, NetView("a"), Reachability(), NetView("b")) == [LOCAL[1]]
    assert addrs_for(LOCAL, NetView("a"), Reachability(), NetView("a")) == LOCAL


ips = st.sampled_from(["127.0.0.1", "10.0.1.2", "192.168.0.3", "198.51.100.1", "203.0.113.1", "192.0.2.2"])
views = st.builds(NetView, st.sampled_from(["", "n1", "n2"]), st.one_of(st.none(), ips))


@given(st.lists(ips, max_size=5), views, views, st.booleans(), st.booleans())
def test_never_an_address_the_peer_cannot_use(local_ips, mine, theirs, checked, circuit):
    local = [f"/ip4/{ip}/tcp/4000" for ip in local_ips]
    reach = Reachability(circuits=(CIRC,) if circuit else (), checked=checked, public_ip=mine.public_ip)
    out = addrs_for(local, mine, reach, theirs)
    same_net = bool(mine.netid) and mine.netid == theirs.netid
    for addr in out:
        tcp = split_tcp(addr)
        if tcp is None:
            assert addr == CIRC
            continue
        if scope(tcp[0]) == "loopback":
            assert same_net
        if scope(tcp[0]) == "private" and checked:
            assert same_net or (mine.public_ip is not None and mine.public_ip == theirs.public_ip)
        if scope(tcp[0]) == "public" and checked:
            assert False, "an address the relay did not dial back"
    if circuit and not same_net:
        assert out[-1] == CIRC


# -- backoff ---------------------------------------------------------------------------
@given(st.integers(min_value=1, max_value=30))
def test_backoff_doubles_up_to_a_cap_and_announces_once(failures):
    backoff = DialBackoff(first=2.0, cap=60.0)
    now, delays, announced = 0.0, [], 0
    for _ in range(failures):
        assert backoff.ready("p", now)
        delay, first = backoff.failed("p", now)
        delays.append(delay)
        announced += first
        assert not backoff.ready("p", now + delay - 0.001)
        now += delay
    assert announced == 1
    assert delays == sorted(delays) and max(delays) <= 60.0 and delays[0] == 2.0
    assert backoff.ready("other", now)
    assert backoff.succeeded("p") and backoff.ready("p", 0.0) and not backoff.succeeded("p")


def test_only_the_owner_announces_relays():
    good = "/ip4/203.0.113.7/tcp/4001/p2p/12D3KooWrelay"
    assert announced_relays("alice", "alice/friends", [good, 5, "junk", good + CIRCUIT]) == [good]
    assert announced_relays("bob", "alice/friends", [good]) == []
    assert announced_relays("alice", "alice/friends", "not a list") == []
