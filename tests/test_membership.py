"""The owner's signed member list, invitations and endorsements, the board's registry and invitation codes:
pure logic, no sockets."""

from __future__ import annotations

import base64
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from p2pexec.board.commands import CommandError
from p2pexec.board.registry import Registry
from p2pexec.invites import Invitation
from p2pexec.keys import Identity
from p2pexec.membership import INVITE, Entry, MemberList, Membership, endorse
from p2pexec.protocol import messages

CLUSTER = "alice/friends"


def person(name: str) -> Identity:
    return Identity(user=name, signing_key=SigningKey.generate())


ALICE, BOB, CAROL, MALLORY = person("alice"), person("bob"), person("carol"), person("mallory")


def invitation() -> tuple[bytes, bytes]:
    seed = os.urandom(32)
    return seed, bytes(SigningKey(seed).verify_key)


def signed(version: int, members: dict, owner: Identity = ALICE) -> str:
    return MemberList(CLUSTER, version, members).signed(owner).to_json()


def test_only_the_owners_newer_list_takes():
    m = Membership(CLUSTER, ALICE.public_key)
    assert not m.allows("bob", BOB.public_key)
    assert m.update(signed(2, {"bob": (Entry.ssh(BOB.public_key),)}))
    assert m.allows("bob", BOB.public_key) and m.allows("alice", ALICE.public_key)
    assert not m.update(signed(1, {}))  # older
    assert not m.update(signed(3, {"mallory": (Entry.ssh(MALLORY.public_key),)}, owner=MALLORY))  # not the owner
    tampered = signed(4, {"bob": (Entry.ssh(BOB.public_key),)}).replace('"version":4', '"version":5')
    assert not m.update(tampered)
    assert m.update(signed(5, {}))
    assert not m.allows("bob", BOB.public_key)


def test_an_invitation_key_vouches_for_the_friends_own_key_only():
    seed, public = invitation()
    m = Membership(CLUSTER, ALICE.public_key)
    m.update(signed(1, {"bob": (Entry(INVITE, public),)}))
    good = endorse(seed, CLUSTER, "bob", BOB.public_key)
    assert not m.allows("bob", BOB.public_key)
    assert not m.admit("bob", MALLORY.public_key, good)  # the endorsement names bob's key
    assert not m.admit("carol", BOB.public_key, endorse(seed, CLUSTER, "carol", BOB.public_key))  # not carol's
    assert not m.admit("bob", BOB.public_key, endorse(seed, "alice/other", "bob", BOB.public_key))
    assert not m.admit("bob", BOB.public_key, endorse(os.urandom(32), CLUSTER, "bob", BOB.public_key))
    assert m.admit("bob", BOB.public_key, good)
    assert m.allows("bob", BOB.public_key) and not m.allows("bob", MALLORY.public_key)
    m.update(signed(2, {}))  # removed: the endorsement no longer counts
    assert not m.allows("bob", BOB.public_key)


def test_membership_messages_update_the_inbox_and_go_no_further():
    seed, public = invitation()
    m = Membership(CLUSTER, ALICE.public_key)
    inbox = messages.Inbox(CLUSTER, m)
    listed = messages.encode(ALICE, CLUSTER, "members", {"list": signed(1, {"bob": (Entry(INVITE, public),)})},
                             now=1000, ttl=60)
    assert inbox.receive(listed, 1001) is None and m.list is not None and m.list.version == 1
    joined = messages.encode(BOB, CLUSTER, "joined", {"endorsement": base64.b64encode(
        endorse(seed, CLUSTER, "bob", BOB.public_key)).decode()}, now=1000, ttl=60)
    assert inbox.receive(joined, 1001) is None and m.allows("bob", BOB.public_key)
    hello = messages.encode(BOB, CLUSTER, "hello", {"role": "client"}, now=1000, ttl=60)
    assert inbox.receive(hello, 1001) is not None
    forged = messages.encode(MALLORY, CLUSTER, "members", {"list": signed(9, {}, owner=MALLORY)}, now=1000, ttl=60)
    assert inbox.receive(forged, 1001) is None and m.list.version == 1  # mallory is no member, nor the owner
    fake_join = messages.encode(person("bob"), CLUSTER, "joined", {"endorsement": base64.b64encode(
        endorse(os.urandom(32), CLUSTER, "bob", BOB.public_key)).decode()}, now=1000, ttl=60)
    assert inbox.receive(fake_join, 1001) is None and inbox.dropped["not-a-member"] >= 1


@settings(max_examples=50, deadline=None)
@given(st.permutations(list(range(1, 8))))
def test_whatever_the_order_lists_arrive_in_the_newest_wins(order):
    lists = {v: signed(v, {f"u{v}": (Entry.ssh(BOB.public_key),)}) for v in order}
    m = Membership(CLUSTER, ALICE.public_key)
    for version in order:
        m.update(lists[version])
    assert m.list is not None and m.list.version == 7 and list(m.list.members) == ["u7"]


@given(st.text("abcdefghijklmnopqrstuvwxyz0123456789_.-", min_size=1, max_size=20).filter(
    lambda s: not s.startswith(("-", "."))), st.binary(min_size=32, max_size=32))
def test_invitation_codes_round_trip(user, seed):
    code = Invitation("ssh://%s@board.example:2222" % user, "ssh-ed25519 AAAA", CLUSTER, ALICE.openssh_public,
                      user, seed).code()
    assert Invitation.parse(code) == Invitation.parse(code + "\n")
    assert Invitation.parse(code).seed == seed and Invitation.parse(code).user == user


def test_a_garbled_code_says_what_to_copy():
    with pytest.raises(Exception, match="copy the whole last line"):
        Invitation.parse("p2pexec1:bm90IGpzb24")


def test_registry_invitations_are_one_time_and_expire():
    now = 1000.0
    registry = Registry()
    seed, public = invitation()
    registry.invite(CLUSTER, "bob", base64.b64encode(public).decode(), now)
    assert registry.invited("bob", now) and not registry.allows("bob", BOB.public_key)
    with pytest.raises(CommandError, match="does not match"):
        registry.join(CLUSTER, "bob", BOB.public_key,
                      base64.b64encode(endorse(os.urandom(32), CLUSTER, "bob", BOB.public_key)).decode(), now)
    registry.join(CLUSTER, "bob", BOB.public_key,
                  base64.b64encode(endorse(seed, CLUSTER, "bob", BOB.public_key)).decode(), now)
    assert registry.allows("bob", BOB.public_key) and not registry.invited("bob", now)
    with pytest.raises(CommandError, match="no open invitation"):  # used once
        registry.join(CLUSTER, "bob", MALLORY.public_key,
                      base64.b64encode(endorse(seed, CLUSTER, "bob", MALLORY.public_key)).decode(), now)
    saved = json.loads(json.dumps(registry.snapshot()))  # as the board saves and reads it back
    assert Registry(saved).allows("bob", BOB.public_key)
    registry.invite(CLUSTER, "carol", base64.b64encode(invitation()[1]).decode(), now)
    assert registry.invited("carol", now + 6 * 86400)
    assert not registry.invited("carol", now + 8 * 86400)


def test_registry_keeps_only_the_owners_newer_list():
    registry = Registry()
    registry.set_list(CLUSTER, ALICE.public_key, signed(2, {"bob": (Entry.ssh(BOB.public_key),)}))
    with pytest.raises(CommandError, match="newer member list signed by"):
        registry.set_list(CLUSTER, ALICE.public_key, signed(1, {}))
    with pytest.raises(CommandError, match="newer member list signed by"):
        registry.set_list(CLUSTER, ALICE.public_key, signed(3, {}, owner=MALLORY))  # not the key alice logged in with

    assert MemberList.from_json(json.loads(registry.view(CLUSTER))["list"]).version == 2
