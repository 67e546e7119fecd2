"""Signed board messages: what is accepted and what is dropped (pure, no I/O)."""

from __future__ import annotations

import json
import math
import time

import pytest
from hypothesis import given, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from hypothesis import strategies as st
from nacl.signing import SigningKey

from p2pexec.keys import Identity, Keyring, openssh_public_line
from p2pexec.protocol import messages
from p2pexec.protocol.messages import Inbox, InvalidMessage, decode, encode, route

CLUSTER = "alice/friends"
ALICE = Identity("alice", SigningKey.generate())
BOB = Identity("bob", SigningKey.generate())
MALLORY = Identity("mallory", SigningKey.generate())
KEYRING = Keyring.parse(f"alice {openssh_public_line(ALICE.public_key)}\nbob {openssh_public_line(BOB.public_key)}\n")
NOW = 1_800_000_000.0


def request(ident=ALICE, now=NOW, ttl=10.0, cluster=CLUSTER, **body):
    fields = {"req": "r1", "n": 3, "py": "3.11"} | body
    return encode(ident, cluster, "request", fields, now=now, ttl=ttl)


def test_roundtrip_keeps_every_field():
    msg = decode(request())
    assert (msg.type, msg.sender, msg.cluster, msg["n"], msg.key) == ("request", "alice", CLUSTER, 3, ALICE.public_key)


def test_member_message_accepted_once_then_replay_dropped():
    inbox = Inbox(CLUSTER, KEYRING)
    line = request()
    assert inbox.receive(line, NOW) is not None
    assert inbox.receive(line, NOW) is None
    assert inbox.dropped["replayed"] == 1


@pytest.mark.parametrize("line, reason", [
    (request(MALLORY), "not-a-member"),
    (request(cluster="alice/other"), "other-cluster"),
    (request(now=NOW - 20, ttl=10), "expired"),
    (request(now=NOW + 3600), "expired"),
    (b"not json", "not-json"),
    (b"[1,2]", "not-object"),
], ids=["stranger", "other-cluster", "expired", "from-the-future", "not-json", "not-object"])
def test_bad_lines_dropped_with_reason(line, reason):
    inbox = Inbox(CLUSTER, KEYRING)
    assert inbox.receive(line, NOW) is None
    assert inbox.dropped[reason] == 1


def test_lines_addressed_to_others_are_dropped_before_their_signature_is_checked():
    decline = encode(BOB, CLUSTER, "decline", {"req": "r1", "to": "carol", "why": "python"}, now=NOW, ttl=10)
    tampered = decline.replace(b'"python"', b'"pythoX"')  # its signature no longer holds
    alices = Inbox(CLUSTER, KEYRING, me="alice")
    assert alices.receive(tampered, NOW) is None and alices.dropped == {"not-for-us": 1}
    carols = Inbox(CLUSTER, KEYRING, me="carol")
    assert carols.receive(tampered, NOW) is None and carols.dropped == {"bad-signature": 1}
    assert carols.receive(decline, NOW) is not None
    assert alices.receive(request(), NOW) is not None  # unaddressed lines are for everyone
    clients = Inbox(CLUSTER, KEYRING, me="carol", skip=frozenset({"request"}))
    assert clients.receive(request(), NOW) is None and clients.dropped == {"not-for-us": 1}


def test_member_name_with_another_members_key_is_rejected():
    # bob signs a message claiming to be alice: valid signature, wrong key for the name
    forged = encode(Identity("alice", BOB.signing_key), CLUSTER, "request",
                    {"req": "r", "n": 1, "py": "3.11"}, now=NOW, ttl=5)
    inbox = Inbox(CLUSTER, KEYRING)
    assert inbox.receive(forged, NOW) is None
    assert inbox.dropped["not-a-member"] == 1
    assert route(forged, "alice", ALICE.public_key, CLUSTER).refusal == "bad-sender"
    assert route(request(), "alice", ALICE.public_key, CLUSTER).refusal is None
    assert route(request(), "bob", ALICE.public_key, CLUSTER).refusal == "bad-sender"
    assert route(request(cluster="alice/other"), "alice", ALICE.public_key, CLUSTER).refusal == "other-cluster"
    assert route(b"plain text", "alice", ALICE.public_key, CLUSTER).refusal == "not-a-message"
    assert route(b"plain text", "alice", ALICE.public_key, None).refusal is None  # not a cluster's topic


# Whitespace to JSON (the first four), to str.strip(), or to neither; and a BOM.
SPACES = [" ", "\t", "\r", "\n", "\x0b", "\x0c", "\x85", "\xa0", "\u2028", "\u3000", "\ufeff", ""]


def _with_duplicate(line: bytes, name: str, value: object, first: bool) -> bytes:
    """``line`` with a second ``name`` field, before (``first``) or after all the others."""
    extra = json.dumps(name) + ":" + json.dumps(value)
    text = line.decode()
    return ("{" + extra + "," + text[1:] if first else text[:-1] + "," + extra + "}").encode()


@st.composite
def disguised(draw):
    """A line signed by alice or by bob, then padded, re-encoded or given a second sender."""
    signer = draw(st.sampled_from([ALICE, BOB, Identity("alice", BOB.signing_key)]))
    line = request(signer)
    if draw(st.booleans()):
        other = draw(st.sampled_from([ALICE, BOB]))
        line = _with_duplicate(line, draw(st.sampled_from(["from", "key"])),
                               other.user if draw(st.booleans()) else messages.b64(other.public_key),
                               draw(st.booleans()))
    text = draw(st.sampled_from(SPACES)) + line.decode() + draw(st.sampled_from(SPACES))
    return text.encode(draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-32"])))


@settings(max_examples=300, deadline=None)
@given(line=disguised())
def test_board_and_receivers_read_a_relayed_line_alike(line):
    """Whatever the board relays from bob's session, every receiver reads as bob's, or drops."""
    if route(line, "bob", BOB.public_key, CLUSTER).refusal is None:
        msg = decode(line)
        assert (msg.sender, msg.key) == ("bob", BOB.public_key)
        assert json.loads(line)["from"] == "bob"  # even a lax reader would agree
    inbox = Inbox(CLUSTER, KEYRING)
    msg = inbox.receive(line, NOW)
    assert msg is None or route(line, msg.sender, msg.key, CLUSTER).refusal is None


@pytest.mark.parametrize("line, reason", [
    (b" " + request(), "padded"),
    (request() + b"\r", "padded"),
    ("\u00a0".encode() + request(), "not-json"),
    ("\u3000".encode() + request(), "not-json"),
    (b"\xef\xbb\xbf" + request(), "not-json"),
    (request().decode().encode("utf-16"), "not-json"),
    (_with_duplicate(request(BOB), "from", "alice", first=True), "duplicate-key"),
    (_with_duplicate(request(), "n", 4, first=False), "duplicate-key"),
], ids=["space", "cr", "nbsp", "ideographic-space", "bom", "utf-16", "two-senders", "two-counts"])
def test_lines_a_lax_parser_would_read_are_refused(line, reason):
    with pytest.raises(InvalidMessage) as exc:
        decode(line)
    assert exc.value.reason == reason


@given(field=st.sampled_from(["req", "n", "from", "cluster", "ts", "exp", "id", "type"]),
       value=st.one_of(st.integers(), st.text(max_size=20), st.none(), st.floats(allow_nan=False)))
def test_any_altered_field_breaks_the_signature(field, value):
    fields = json.loads(request())
    if fields.get(field) == value:
        return
    fields[field] = value
    with pytest.raises(InvalidMessage):
        decode(json.dumps(fields).encode())


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_garbage_never_raises_anything_but_invalid_message(data):
    inbox = Inbox(CLUSTER, KEYRING)
    assert inbox.receive(data, NOW) is None


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                    max_leaves=12))
def test_arbitrary_json_is_rejected_cleanly(value):
    try:
        line = json.dumps(value).encode()
    except ValueError:
        return
    with pytest.raises(InvalidMessage):
        decode(line)


def test_oversize_and_bad_ttl_refused_when_encoding():
    with pytest.raises(ValueError):
        request(req="x" * 5000)
    with pytest.raises(ValueError):
        request(ttl=10_000)


def test_live_clock_roundtrip():
    line = request(now=time.time())
    assert Inbox(CLUSTER, KEYRING).receive(line, time.time()) is not None


def test_plain_data_fast_path_round_trips_and_rejects_lookalikes():
    import collections
    from functools import partial

    from p2pexec.tasks import PrepickledFunction, dump_task, is_plain, load_task

    assert is_plain(((1, 2.5, "x", b"y", None, True), {"k": [1, {2}, frozenset()]}))
    assert not is_plain((collections.OrderedDict(),))  # a subclass: leave it to dill
    assert not is_plain(([0] * 70_000,))  # too big to check cheaply: dill
    fn = PrepickledFunction(partial(divmod, 7))
    got_fn, args, kwargs = load_task(b"".join(dump_task(fn, (2,), {})))
    assert got_fn(*args, **kwargs) == (3, 1)


def test_large_buffers_travel_out_of_band_in_both_directions():
    from functools import partial

    from p2pexec.tasks import OUT_OF_BAND, PrepickledFunction, dump_outcome, dump_task, load_outcome

    big = bytes(OUT_OF_BAND * 4)
    for parts in (dump_task(len, (big,), {}), dump_task(PrepickledFunction(partial(len)), (big,), {}),
                  dump_outcome(True, big, "", ""), dump_outcome(True, bytearray(big), "", ""),
                  dump_outcome(True, memoryview(big), "", "")):
        sizes = [memoryview(p).nbytes for p in parts]
        assert sizes[-1] == len(big) and sum(sizes) < len(big) + 4096  # the payload itself, uncopied
    for value in (big, bytearray(big), memoryview(big)):
        back = load_outcome(b"".join(dump_outcome(True, value, "", ""))).value
        assert type(back) is type(value) and bytes(back) == big


class InboxReplay(RuleBasedStateMachine):
    """Replays within their expiry are always dropped; a fresh id is never taken for a replay.

    Messages get random ids, lifetimes and clock skews; the clock moves in random steps
    (now and then backwards: a message that expired by the latest time seen stays expired,
    since its id may be forgotten).  A small limit makes the flood cap part of the run.
    """

    LIMIT = 12

    def __init__(self) -> None:
        super().__init__()
        self.now = NOW
        self.latest = -math.inf  # the latest time the inbox was given (none yet)
        self.inbox = Inbox(CLUSTER, KEYRING, max_seen=self.LIMIT)
        self.accepted: dict[str, tuple[bytes, float]] = {}  # id -> (line, exp)
        self.fresh = 0

    def _retained(self) -> int:
        return sum(1 for _, exp in self.accepted.values() if exp > self.now - 1)  # kept up to 1 s past exp

    @rule(ttl=st.floats(0.5, messages.MAX_LIFETIME), skew=st.floats(-30, 30))
    def send_fresh(self, ttl, skew):
        self.fresh += 1
        msg_id = f"m{self.fresh}"
        line = encode(ALICE, CLUSTER, "withdraw", {"req": "r"}, now=self.now + skew, ttl=ttl, msg_id=msg_id)
        exp = decode(line).exp
        before = self.inbox.dropped.copy()
        self.latest = max(self.latest, self.now)
        if self.inbox.receive(line, self.now) is not None:
            self.accepted[msg_id] = (line, exp)
            return
        (reason,) = (self.inbox.dropped - before).keys()
        if reason == "seen-full":
            assert self._retained() >= self.LIMIT
        else:
            assert reason == "expired" and exp <= self.latest

    @precondition(lambda self: self.accepted)
    @rule(data=st.data())
    def replay(self, data):
        msg_id = data.draw(st.sampled_from(sorted(self.accepted)))
        line, exp = self.accepted[msg_id]
        before = self.inbox.dropped.copy()
        self.latest = max(self.latest, self.now)
        assert self.inbox.receive(line, self.now) is None
        (reason,) = (self.inbox.dropped - before).keys()
        assert reason == ("replayed" if exp > self.latest else "expired")

    @rule(step=st.one_of(st.floats(0, 5), st.floats(5, 400), st.floats(-3, 0)))
    def tick(self, step):
        self.now += step

    @invariant()
    def bounded(self):
        assert len(self.inbox._seen) <= self.LIMIT  # noqa: SLF001


TestInboxReplay = InboxReplay.TestCase
TestInboxReplay.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@given(st.one_of(st.text(max_size=60), st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2)))
def test_a_peers_machine_name_is_kept_only_if_short_and_plain(value):
    kept = messages.machine_name(value)
    assert kept in ("", value)
    assert len(kept) <= 32 and all(ch.isascii() and (ch.isalnum() or ch in "._-") for ch in kept)
    assert not kept.startswith(("-", ".", "_"))


@pytest.mark.parametrize("hostname, name", [
    ("bobs-laptop.fritz.box", "bobs-laptop"), ("Bob's MacBook Pro.local", "BobsMacBookPro"),
    ("x" * 40, "x" * 32), ("-dash", ""), ("", ""), ("été", "t"),
])
def test_a_host_name_becomes_a_machine_name(hostname, name):
    assert messages.host_machine_name(hostname) == name


def test_a_machine_name_peers_would_not_keep_is_refused_at_the_command_line(capsys):
    from p2pexec.worker_cli import main

    with pytest.raises(SystemExit) as exited:
        main(["--cluster", "alice/friends", "--name", "bob's laptop"])
    assert exited.value.code == 2
    assert "a machine name is 1 to 32 letters, digits" in capsys.readouterr().err
