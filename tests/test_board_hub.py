"""The board's hub on its own: no sockets, threads or clock, so every rule is checked directly, and a
hypothesis state machine drives it with random sessions, lines, access lists and users files."""

from __future__ import annotations

import base64

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from nacl.signing import SigningKey

from p2pexec.board.commands import CommandError, parse
from p2pexec.board.fanout import MIN_FANOUT
from p2pexec.board.hub import End, EndOutput, HangUp, Hub, Persist, Refused
from p2pexec.keys import Identity, Keyring
from p2pexec.membership import INVITE, Entry, MemberList, endorse
from p2pexec.protocol import messages

PEOPLE = {name: Identity(user=name, signing_key=SigningKey.generate()) for name in ("alice", "bob", "carol")}
KEY = {name: who.public_key for name, who in PEOPLE.items()}
WALL = 1_700_000_000.0


def keyring(*names: str) -> Keyring:
    return Keyring({n: {KEY[n]} for n in names})


def hub(**kw) -> Hub:
    return Hub(keyring(*PEOPLE), **kw)


BODIES = {"hello": {"role": "client"}, "worker": {"role": "worker", "free": 1}, "busy": {"role": "worker", "free": 0},
          "observer": {"role": "observer"}, "request": {"req": "r", "n": 1, "py": "3.12"}, "withdraw": {"req": "r"}}


def line(signer: str, cluster: str, kind: str = "hello", to: str = "bob") -> bytes:
    body = BODIES.get(kind, {"req": "r", "to": to, "why": "python"})
    mtype = {"worker": "hello", "busy": "hello", "observer": "hello"}.get(kind, kind)
    return messages.encode(PEOPLE[signer], cluster, mtype, body, now=WALL, ttl=60) + b"\n"


def join(h: Hub, conn: str, command: str, now: float = 0.0):
    login = h.login(conn)
    assert login is not None
    session, _ = h.join(conn, parse(command, login.user), WALL, now)
    return session


def say(h: Hub, session, data: bytes, now: float = 0.0):
    sender = h.sender(session.id)
    assert sender is not None
    return h.relay(session.id, sender.check(data), now)


def logged_in(h: Hub, **conns: str) -> Hub:
    for conn, user in conns.items():
        assert h.log_in(conn, user, KEY[user], WALL)
    return h


def test_a_line_goes_to_the_subs_and_pipes_of_its_topic_in_order_and_not_back():
    h = logged_in(hub(verify_sender=False), a="alice", b="bob", c="carol")
    pub = join(h, "a", "pub -p t")
    sub = join(h, "b", "sub -p t")
    pipe = join(h, "c", "pipe -p t")
    echo = join(h, "a", "pipe -p t -r")
    join(h, "b", "sub -p elsewhere")
    assert say(h, pub, b"x\n").to == (sub.id, pipe.id, echo.id)
    assert say(h, pipe, b"y\n").to == (sub.id, echo.id)  # not back to the pipe that said it
    assert say(h, echo, b"z\n").to == (sub.id, pipe.id, echo.id)  # -r: back to itself too
    assert h.relayed == 3


def test_the_sender_check_on_a_clusters_topic():
    h = logged_in(hub(), a="alice", b="bob", c="carol")
    h.set_members("alice/c", ["bob", "carol"])
    alice, bob, carol = join(h, "a", "pipe c"), join(h, "b", "pipe alice/c"), join(h, "c", "sub alice/c")
    assert say(h, alice, line("alice", "alice/c")).to == (bob.id, carol.id)
    assert say(h, bob, line("alice", "alice/c")).refusal == "bad-sender"  # bob relaying alice's line
    assert say(h, bob, b" " + line("bob", "alice/c")).refusal == "not-a-message"  # disguised by a space
    assert say(h, bob, b"plain text\n").refusal == "not-a-message"
    assert say(h, bob, line("bob", "bob/other")).refusal == "other-cluster"
    assert say(h, alice, line("alice", "alice/c", "decline", to="carol")).to == (carol.id,)  # addressed
    assert h.dropped == {"bad-sender": 1, "not-a-message": 2, "other-cluster": 1}


def test_requests_go_to_a_bounded_set_of_workers_and_hellos_to_who_reads_them():
    h = logged_in(hub(sessions_per_user=100), a="alice", b="bob", c="carol")
    h.set_members("alice/c", ["bob", "carol"])
    client = join(h, "a", "pipe c -r")
    other = join(h, "a", "pipe c -r")
    watcher = join(h, "c", "sub alice/c")  # never says hello: gets everything, as on pico
    observer = join(h, "c", "pipe alice/c -r")
    workers = [join(h, "b", "pipe alice/c -r") for _ in range(20)]
    assert say(h, observer, line("carol", "alice/c", "observer")).to == tuple(
        s.id for s in (client, other, watcher, observer, *workers))  # asks everyone to answer
    for w in workers:
        say(h, w, line("bob", "alice/c", "worker"))
    assert say(h, workers[0], line("bob", "alice/c", "worker")).to == (  # not to the other workers
        client.id, other.id, watcher.id, observer.id, workers[0].id)
    say(h, client, line("alice", "alice/c"))
    assert say(h, other, line("alice", "alice/c")).to == (other.id, watcher.id, observer.id)  # a client's hello
    asked = say(h, client, line("alice", "alice/c", "request")).to
    reached = set(asked) - {client.id, watcher.id}
    assert asked[0] == client.id and watcher.id in asked and other.id not in asked and observer.id not in asked
    assert reached <= {w.id for w in workers} and len(reached) == MIN_FANOUT
    again = say(h, client, line("alice", "alice/c", "request")).to  # asking again reaches others
    assert not (set(again) - {client.id, watcher.id}) & reached
    assert set(say(h, client, line("alice", "alice/c", "withdraw")).to) == set(asked) | set(again)
    assert say(h, other, line("alice", "alice/c", "withdraw")).to == (other.id, watcher.id)  # not its request
    for w in workers[:18]:  # busy now
        say(h, w, line("bob", "alice/c", "busy"))
    free = {w.id for w in workers[18:]}
    assert free < set(say(h, other, line("alice", "alice/c", "request")).to)  # the free ones first
    h.leave(workers[19].id)
    assert workers[19].id not in say(h, other, line("alice", "alice/c", "request")).to


def test_without_sender_checks_the_board_knows_no_roles_and_broadcasts():
    h = logged_in(hub(verify_sender=False), a="alice", b="bob")
    h.set_members("alice/c", ["bob"])
    client, worker = join(h, "a", "pipe c"), join(h, "b", "pipe alice/c")
    other = join(h, "a", "pipe c")
    say(h, worker, line("bob", "alice/c", "worker"))
    say(h, other, line("alice", "alice/c"))
    assert say(h, client, line("alice", "alice/c", "request")).to == (worker.id, other.id)


def test_fan_out_off_is_a_broadcast_board():
    h = logged_in(hub(), a="alice", b="bob")
    h.set_members("alice/c", ["bob"])
    h.fan_out = False
    client, worker, other = join(h, "a", "pipe c"), join(h, "b", "pipe alice/c"), join(h, "a", "pipe c")
    say(h, worker, line("bob", "alice/c", "worker"))
    say(h, other, line("alice", "alice/c"))
    assert say(h, client, line("alice", "alice/c", "request")).to == (worker.id, other.id)
    assert h.delivered == 2 + 2 + 2


def test_plain_text_passes_where_there_is_no_access_list_but_a_forgery_never_does():
    h = logged_in(hub(), a="alice", b="bob")
    pub, sub = join(h, "a", "pub -p t"), join(h, "b", "sub -p t")
    assert say(h, pub, b"hi\n").to == (sub.id,)
    assert say(h, pub, line("bob", "public/t")).refusal == "bad-sender"


def test_a_verdict_made_before_the_access_list_changed_is_made_again():
    h = logged_in(hub(), a="alice")
    pipe = join(h, "a", "pipe alice/x")  # no access list (yet): plain text may pass
    checked = h.sender(pipe.id).check(b"plain\n")
    assert checked.route.refusal is None
    h.set_members("alice/x", ["bob"])  # now it is a cluster's topic
    assert h.relay(pipe.id, checked, 0.0).refusal == "not-a-message"


def test_access_lists_decide_who_joins_and_a_removed_member_is_ended_and_gets_nothing():
    h = logged_in(hub(verify_sender=False), a="alice", b="bob", c="carol")
    pipe = join(h, "a", "pipe c -a bob")
    with pytest.raises(Refused, match="access denied"):
        join(h, "c", "sub alice/c")
    with pytest.raises(Refused, match="only alice can set"):
        join(h, "b", "sub alice/c -a bob,carol")
    bob = join(h, "b", "sub alice/c")
    actions = h.set_members("alice/c", ["carol"])
    assert actions == [Persist("clusters"), End(bob.id, 1, "access denied")]
    assert say(h, pipe, b"x\n").to == ()  # bob is being ended: nothing more for him
    assert h.set_members("alice/c", ["carol"]) == []  # unchanged: nothing to do or save
    with pytest.raises(ValueError):
        h.set_members("public/c", [])


def test_a_key_removed_from_the_users_file_hangs_up_its_connections_and_they_get_nothing():
    h = logged_in(hub(verify_sender=False), a="alice", b="bob", b2="bob")
    pub = join(h, "a", "pub -p t")
    join(h, "b", "sub -p t")
    carol = h.log_in("c", "carol", KEY["carol"], WALL) and join(h, "c", "sub -p t")
    assert sorted(a.conn for a in h.set_users(keyring("alice", "carol"), WALL)) == ["b", "b2"]
    assert say(h, pub, b"x\n").to == (carol.id,)
    assert h.set_users(keyring("alice", "carol"), WALL) == []  # hung up once
    assert not h.log_in("b3", "bob", KEY["bob"], WALL)
    with pytest.raises(Refused, match="access revoked"):
        join(h, "b", "sub -p t")


def test_the_last_publisher_leaving_ends_plain_subs_that_saw_one():
    h = logged_in(hub(verify_sender=False), a="alice", b="bob")
    h.set_members("alice/t", ["bob"])
    early = join(h, "b", "sub alice/t")
    pub = join(h, "a", "pub t")
    keep = join(h, "b", "sub alice/t -k")
    late = join(h, "b", "sub alice/t")
    pipe = join(h, "b", "pipe alice/t")
    assert h.leave(pub.id) == [EndOutput(early.id), EndOutput(late.id)]
    assert h.leave(pub.id) == []  # idempotent
    never = join(h, "b", "sub alice/t")  # no publisher since it joined: it stays
    assert h.leave(join(h, "a", "pub t").id) == [EndOutput(early.id), EndOutput(late.id), EndOutput(never.id)]
    for s in (early, keep, late, pipe, never):
        h.leave(s.id)
    assert h.counts("alice/t") == {"pub": 0, "sub": 0, "pipe": 0} and "Subs" not in h.ls("alice")


def test_caps_on_sessions_and_topics_per_user():
    h = logged_in(hub(verify_sender=False, sessions_per_user=2, topics_per_user=2), a="alice")
    assert h.open("ch1", "alice") and h.open("ch2", "alice") and not h.open("ch3", "alice")
    h.close("ch1")
    h.close("ch1")  # idempotent
    assert h.open("ch3", "alice") and not h.open("ch4", "alice")
    join(h, "a", "pipe t1")
    h.set_members("alice/t2", [])
    with pytest.raises(Refused, match="alice has 2 topics"):
        join(h, "a", "pipe t3")
    join(h, "a", "pipe t2")  # one of its own: fine
    join(h, "a", "pipe -p anything")  # public topics are not counted
    assert h.refused == {"sessions-per-user": 2, "topics-per-user": 1}


def test_the_rate_limit_ends_a_session_and_refills_with_time():
    h = logged_in(hub(verify_sender=False, lines_per_second=5), a="alice", b="bob")
    pub, sub = join(h, "a", "pub -p t", now=100.0), join(h, "b", "sub -p t", now=100.0)
    assert all(say(h, pub, b"x\n", now=100.0).to == (sub.id,) for _ in range(10))  # a burst of 10
    assert say(h, pub, b"x\n", now=100.4).to == (sub.id,)  # 0.4 s: two more tokens
    assert say(h, pub, b"x\n", now=100.4).to == (sub.id,)
    ended = say(h, pub, b"x\n", now=100.4)
    assert ended.end == End(pub.id, 1, "rate limit exceeded (5 lines/s), disconnecting") and ended.to == ()
    assert say(h, pub, b"x\n", now=200.0).to == ()  # ended: nothing more from it
    assert h.dropped == {"rate-limit": 1}


def test_an_invitee_may_only_join_and_joining_is_saved():
    h = logged_in(hub(), a="alice")
    newkey = SigningKey.generate()
    dave = Identity(user="dave", signing_key=newkey)
    seed = b"\x01" * 32
    public = bytes(SigningKey(seed).verify_key)
    out, actions = h.command("a", parse(f"invite c dave {base64.b64encode(public).decode()}", "alice"), WALL)
    assert "dave may join alice/c" in out and actions == [Persist("registry")]
    signed = MemberList("alice/c", 1, {"dave": (Entry(INVITE, public),)}).signed(PEOPLE["alice"])
    listed = base64.b64encode(signed.to_json().encode()).decode()
    _, actions = h.command("a", parse(f"members c {listed}", "alice"), WALL)
    assert actions == [Persist("registry"), Persist("clusters")]
    assert h.log_in("d", "dave", dave.public_key, WALL) and h.login("d").joining
    with pytest.raises(CommandError, match="invited here but has not joined"):
        h.command("d", parse("ls", "dave"), WALL)
    endorsement = base64.b64encode(endorse(seed, "alice/c", "dave", dave.public_key)).decode()
    _, actions = h.command("d", parse(f"join alice/c {endorsement}", "dave"), WALL)
    assert actions == [Persist("registry")] and not h.login("d").joining
    assert h.knows("dave", dave.public_key) and h.allowed("dave", "alice/c", dave.public_key)
    assert not h.allowed("dave", "alice/other", dave.public_key)
    assert h.command("d", parse("user", "dave"), WALL)[0] == "dave\n"
    with pytest.raises(CommandError, match="only alice"):
        h.command("d", parse("members alice/c " + listed, "dave"), WALL)


def test_ls_in_picos_format():
    h = logged_in(hub(verify_sender=False), a="alice", b="bob")
    assert h.ls("alice") == "no pubsub channels found\n"
    h.set_members("alice/c", ["bob"])
    join(h, "a", "pub t")
    join(h, "b", "sub -p t")
    join(h, "b", "pipe alice/c")
    assert h.ls("alice") == ("Channel Information\n- alice/c: (Access List: bob)\n  Pipes:\n  - bob#3\n"
                             "- alice/t:\n  Pubs:\n  - alice#1\n")
    assert h.ls("bob") == "no pubsub channels found\n"


# -- the state machine

TOPICS = ("alice/t", "alice/u", "alice/v", "bob/t", "public/p")
CONNS = tuple(f"c{i}" for i in range(6))
CAP_SESSIONS, CAP_TOPICS = 2, 2
LINES = {(signer, cluster, kind, to): line(signer, cluster, kind, to)
         for signer in PEOPLE for cluster in TOPICS for kind in ("decline", *BODIES)
         for to in (tuple(PEOPLE) if kind == "decline" else ("bob",))}
SKIPS = {"worker": {"worker"}, "busy": {"worker"}, "hello": {"worker", "client"}}  # who does not read a hello
ROLE = {"worker": "worker", "busy": "worker", "hello": "client", "observer": "observer"}


class HubMachine(RuleBasedStateMachine):
    """Drives a hub and a model of what it must decide: who is on which topic, who may read it, who
    was cut off, which role each receiver said it has.  Every relay is checked against the model: exactly
    the receivers allowed and interested get a line; a request, a bounded number of the workers."""

    @initialize(users=st.lists(st.sampled_from(sorted(PEOPLE)), min_size=len(CONNS), max_size=len(CONNS)),
                members=st.lists(st.sampled_from(sorted(PEOPLE)), max_size=3),
                joins=st.lists(st.tuples(st.sampled_from(CONNS), st.sampled_from(("pub", "sub", "pipe")),
                                         st.sampled_from(TOPICS), st.booleans()), min_size=2, max_size=8))
    def start(self, users, members, joins) -> None:
        self.hub: Hub = Hub(keyring(*PEOPLE), sessions_per_user=CAP_SESSIONS, topics_per_user=CAP_TOPICS,
                            lines_per_second=1e9)
        self.users = set(PEOPLE)
        self.logins: dict[str, str] = {}  # conn -> user
        self.revoked: set[str] = set()  # conns hung up
        self.members: dict[str, tuple[str, ...]] = {}
        self.sessions: dict[int, tuple[str, str, str, str, bool]] = {}  # id -> conn, user, topic, mode, replay
        self.ended: set[int] = set()
        self.slots: dict[str, str] = {}
        self.roles: dict[int, str] = {}  # receiver -> the role of its last hello relayed
        self.asked: dict[int, set[int]] = {}  # sender -> the workers its request "r" went to
        self.now = 0.0
        for conn, user in zip(CONNS, users):
            self.log_in(conn, user)
        self.set_members("alice/t", members)
        for conn, mode, topic, replay in joins:
            self.enter(conn, mode, topic, replay, None)

    def apply(self, actions) -> None:
        for action in actions:
            if isinstance(action, End):
                self.ended.add(action.session)
            elif isinstance(action, HangUp):
                assert self.logins.get(action.conn) not in self.users
                self.revoked.add(action.conn)

    def may_read(self, user: str, topic: str) -> bool:
        owner = topic.split("/")[0]
        return owner == "public" or user == owner or user in self.members.get(topic, ())

    def room(self, topic: str) -> bool:
        owner = topic.split("/")[0]
        live = {t for (_, _, t, _, _) in self.sessions.values()}
        owned = {t for t in live | set(self.members) if t.split("/")[0] == owner}
        return owner == "public" or topic in owned or len(owned) < CAP_TOPICS

    @rule(conn=st.sampled_from(CONNS), user=st.sampled_from(sorted(PEOPLE)))
    def log_in(self, conn: str, user: str) -> None:
        if conn in self.logins:
            return
        ok = self.hub.log_in(conn, user, KEY[user], WALL)
        assert ok == (user in self.users)
        if ok:
            self.logins[conn] = user

    @rule(conn=st.sampled_from(CONNS))
    def hang_up(self, conn: str) -> None:
        self.hub.log_out(conn)
        if self.logins.pop(conn, None) is not None:
            for sid, s in list(self.sessions.items()):
                if s[0] == conn:
                    self.hub.leave(sid)
                    del self.sessions[sid]
        self.revoked.discard(conn)

    @precondition(lambda self: self.logins)
    @rule(data=st.data(), mode=st.sampled_from(("pub", "sub", "pipe")), topic=st.sampled_from(TOPICS),
          replay=st.booleans(), access=st.none() | st.lists(st.sampled_from(sorted(PEOPLE)), max_size=2))
    def join(self, data, mode: str, topic: str, replay: bool, access) -> None:
        self.enter(data.draw(st.sampled_from(sorted(self.logins))), mode, topic, replay, access)

    def enter(self, conn: str, mode: str, topic: str, replay: bool, access) -> None:
        user = self.logins[conn]
        owner, name = topic.split("/")
        words = [mode, topic if owner != "public" else f"-p {name}"]
        if replay and mode == "pipe":
            words.append("-r")
        if access is not None and owner != "public":
            words += ["-a", ",".join(access) or "''"]
        cmd = parse(" ".join(words), user)
        ok_login = conn not in self.revoked and user in self.users
        if cmd.access is not None:
            setting = user == owner and self.room(topic)
            expected = setting and ok_login
        else:
            expected = ok_login and self.room(topic) and self.may_read(user, topic)
        try:
            session, actions = self.hub.join(conn, cmd, WALL, self.now)
        except Refused as exc:
            assert not expected, str(exc)
            actions = exc.actions
            session = None
        else:
            assert expected
        if cmd.access is not None and user == owner and self.room(topic):
            self.members[topic] = tuple(dict.fromkeys(cmd.access))
        self.apply(actions)
        if session is not None:
            self.sessions[session.id] = (conn, user, topic, mode, cmd.replay)

    @precondition(lambda self: self.sessions)
    @rule(data=st.data())
    def leave(self, data) -> None:
        sid = data.draw(st.sampled_from(sorted(self.sessions)))
        self.apply(self.hub.leave(sid))
        del self.sessions[sid]

    @precondition(lambda self: self.sessions)
    @rule(kind=st.sampled_from(("plain", "own", "forged", "other-cluster", "addressed", "worker", "busy",
                                "observer", "request", "withdraw")),
          to=st.sampled_from(sorted(PEOPLE)))
    def everyone_says(self, kind: str, to: str) -> None:
        """Each session in turn says a line of ``kind``: each relay is checked."""
        for sid in sorted(self.sessions):
            self.say(sid, kind, to)

    def say(self, sid: int, kind: str, to: str) -> None:
        conn, user, topic, mode, replay = self.sessions[sid]
        forger = next(p for p in PEOPLE if p != user)
        other = next(t for t in TOPICS if t != topic)
        text = {"plain": b"plain\n", "own": LINES[user, topic, "hello", "bob"],
                "forged": LINES[forger, topic, "hello", "bob"], "other-cluster": LINES[user, other, "hello", "bob"],
                "addressed": LINES[user, topic, "decline", to]}.get(kind) or LINES[user, topic, kind, "bob"]
        self.now += 0.001
        relayed = say(self.hub, self.hub.session(sid), text, self.now)
        cluster = topic in self.members
        sending = sid not in self.ended and conn not in self.revoked
        refusal = {"plain": "not-a-message" if cluster else None, "forged": "bad-sender",
                   "other-cluster": "other-cluster" if cluster else None}.get(kind)
        assert relayed.end is None
        assert relayed.refusal == (refusal if sending else None)
        if not sending or refusal is not None:
            assert relayed.to == ()
            return
        hello = {"own": "hello", "other-cluster": "hello"}.get(kind, kind)
        if hello in ROLE and mode != "pub":
            self.roles[sid] = ROLE[hello]
        live = {r for r, (c, u, t, m, _) in self.sessions.items()
                if t == topic and m != "pub" and r not in self.ended and c not in self.revoked}
        echo = {sid} if replay else set()
        unknown = {r for r in live if r not in self.roles} - {sid}
        workers = {r for r in live if self.roles.get(r) == "worker"} - {sid}
        got = set(relayed.to)
        assert len(got) == len(relayed.to)
        if kind == "request":
            reached = got - unknown - echo
            assert got >= unknown | echo and reached <= workers and sid not in reached
            if len(workers) <= MIN_FANOUT:
                assert reached == workers
            self.asked.setdefault(sid, set()).update(reached)
            return
        if kind == "withdraw":
            expected = echo | unknown | (self.asked.get(sid, set()) & workers)
        else:
            skips = SKIPS.get(hello, set())
            expected = {r for r in live if (r == sid and replay) or (r != sid and self.roles.get(r) not in skips)}
            if kind == "addressed":
                expected = {r for r in live if (r != sid or replay) and (self.sessions[r][1] == to or r == sid)}
                assert list(relayed.to) == sorted(relayed.to)  # in the order they joined, as every line
        assert got == expected
        for r in relayed.to:  # whatever the model says: never to someone who may not read it
            s = self.hub.session(r)
            assert s is not None and s.topic == topic and self.hub.allowed(s.user, topic, s.key)

    @rule(topic=st.sampled_from(TOPICS[:-1]), names=st.lists(st.sampled_from(sorted(PEOPLE)), max_size=3))
    def set_members(self, topic: str, names) -> None:
        if not self.room(topic):
            return  # the server refuses it before (members LIST, -a): set_members itself does not check
        self.apply(self.hub.set_members(topic, names))
        self.members[topic] = tuple(dict.fromkeys(names))

    @rule(users=st.sets(st.sampled_from(sorted(PEOPLE)), min_size=2))
    def set_users(self, users) -> None:
        self.users = set(users)
        self.apply(self.hub.set_users(keyring(*users), WALL))

    @rule(key=st.sampled_from(("k1", "k2", "k3", "k4", "k5", "k6")), user=st.sampled_from(sorted(PEOPLE)))
    def open_command(self, key: str, user: str) -> None:
        if key in self.slots:
            return
        running = sum(1 for u in self.slots.values() if u == user)
        assert self.hub.open(key, user) == (running < CAP_SESSIONS)
        if running < CAP_SESSIONS:
            self.slots[key] = user

    @rule(key=st.sampled_from(("k1", "k2", "k3", "k4", "k5", "k6")))
    def close_command(self, key: str) -> None:
        self.hub.close(key)
        self.slots.pop(key, None)

    @invariant()
    def counts_match(self) -> None:
        for topic in TOPICS:
            live = [m for (_, _, t, m, _) in self.sessions.values() if t == topic]
            assert self.hub.counts(topic) == {m: live.count(m) for m in ("pub", "sub", "pipe")}
            assert self.hub.members(topic) == self.members.get(topic)

    @invariant()
    def topics_per_owner_capped(self) -> None:
        live = {t for (_, _, t, _, _) in self.sessions.values()}
        for owner in ("alice", "bob"):  # alice has three topics to try
            assert len({t for t in live | set(self.members) if t.startswith(owner + "/")}) <= CAP_TOPICS

    @invariant()
    def no_one_cut_off_is_still_sending_or_reading_with_a_login(self) -> None:
        for conn in self.revoked:
            login = self.hub.login(conn)
            assert login is None or login.revoked


HubMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)
test_hub_state_machine = HubMachine.TestCase
