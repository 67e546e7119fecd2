"""The board's decisions, without sockets, threads or a clock: who is on which topic, who may read it,
and where each line goes.

The SSH server (:mod:`.server`) reports what happens and the time, and does
what the hub answers::

    SSH server                                 Hub                         answers
    ──────────                                 ───                         ───────
    key accepted ─────────────── log_in ─────► logins                  ──► known / invited / no
    command starts, ends ─────── open, close ► sessions per user       ──► room or not
    pub, sub, pipe ───────────── join ───────► topics, access lists    ──► Session, or Refused
    a line from a session ────── relay ──────► route(), rate limits    ──► Relay: which sessions get it
    session over ─────────────── leave ──────► topics                  ──► EndOutput for plain subs
    users file read again ────── set_users ──► logins                  ──► HangUp for keys gone
    -a, members LIST ─────────── set_members ► access lists            ──► End (access denied), Persist
    invite, join, members, ls ── command ────► the registry            ──► the answer, Persist

Like h11's ``ConnectionState`` the hub is not thread-safe: the server calls
it under one lock and performs the actions (writes to channels, closing,
saving) outside it, so a slow client or disk never holds up the board.  A line's
signature is checked outside that lock too (:meth:`Sender.check`): the hub
then only takes a verdict made against its current view of the topic.
"""

from __future__ import annotations

import base64
import collections
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from ..keys import valid_username
from ..protocol.messages import Route, route
from .commands import HELP, PUBLIC, Command, CommandError, valid_topic
from .fanout import FanOut
from .registry import INVITE_DAYS, Registry

C = TypeVar("C", bound=Hashable)  # how the server names a connection
K = TypeVar("K", bound=Hashable)  # how the server names a running command (its channel)

STREAMS = ("pub", "sub", "pipe")


class Users(Protocol):
    """The board's users file, as the hub needs it (:class:`..keys.Keyring`)."""

    def allows(self, user: str, key: bytes) -> bool: ...


# -- actions: what the server must do after a call

@dataclass(frozen=True)
class End:
    """End session ``session`` now with ``status`` and ``message`` on its stderr."""

    session: int
    status: int
    message: str | None


@dataclass(frozen=True)
class EndOutput:
    """Session ``session`` (a plain sub whose last publisher left) gets no more lines: end it once its
    queued lines are written."""

    session: int


@dataclass(frozen=True)
class HangUp(Generic[C]):
    """Connection ``conn`` lost its key: end its sessions (``access revoked``) and hang up."""

    conn: C


@dataclass(frozen=True)
class Persist:
    """``what`` (``"clusters"``: the access lists; ``"registry"``: :class:`.Registry`) changed: save it."""

    what: str


Action = End | EndOutput | HangUp | Persist


class Refused(Exception):
    """A session may not start; ``str(exc)`` goes to the client's stderr.  ``actions``: still to be
    done (an access list set on the way in)."""

    def __init__(self, message: str, actions: Iterable[Action] = ()) -> None:
        super().__init__(message)
        self.actions = list(actions)


@dataclass(frozen=True)
class Relay:
    """What becomes of one line: the sessions it goes to, in the order of :attr:`to`, or why it goes nowhere.

    ``refusal`` is set (and counted in ``dropped``) when policy drops the line; ``end`` when the sender
    broke its rate limit and must be ended with that message.
    """

    to: tuple[int, ...] = ()
    refusal: str | None = None
    end: End | None = None


class Bucket:
    """A token bucket: ``rate`` lines a second on average, bursts of ``max(10, 2 * rate)``."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.burst = self.tokens = max(10.0, 2 * rate)
        self.last = now

    def take(self, now: float) -> bool:
        """Spend a token on one line at ``now`` (monotonic seconds); False if there is none left."""
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.last) * self.rate)
        self.last = max(self.last, now)
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass
class Login:
    """Who a connection logged in as; ``joining``: on an invitation, so it may only run ``join``."""

    user: str
    key: bytes
    joining: bool
    revoked: bool = False  # its key is no longer its user's: being hung up


@dataclass(frozen=True)
class Sender:
    """What the sender check of one session depends on, as of one moment (see :meth:`Hub.sender`)."""

    user: str
    key: bytes
    cluster: str | None  # the topic, if it has an access list: only that cluster's messages pass
    verify: bool

    def check(self, line: bytes) -> "Checked":
        """The verdict on ``line`` (ending in a newline).  Pure but costly (a signature check): the server
        runs it outside its lock."""
        verdict = route(line[:-1], self.user, self.key, self.cluster) if self.verify else Route()
        return Checked(line, self, verdict)


@dataclass(frozen=True)
class Checked:
    """A line with its verdict, and the view of the sender it was made against."""

    line: bytes
    sender: Sender
    route: Route


@dataclass(eq=False)
class Session(Generic[C]):
    """One pub, sub or pipe on a topic."""

    id: int
    conn: C
    user: str
    key: bytes
    cmd: Command
    bucket: Bucket
    saw_publisher: bool = False  # sub: a pub has been here since it joined
    ending: bool = False  # the hub told the server to end it: it gets and sends nothing more

    @property
    def topic(self) -> str:
        assert self.cmd.topic is not None
        return self.cmd.topic

    @property
    def client_id(self) -> str:
        return f"{self.user}#{self.id}"


@dataclass(eq=False)
class _Topic(Generic[C]):
    receivers: list[Session[C]] = field(default_factory=list)  # subs and pipes, in the order they joined
    by_user: dict[str, list[Session[C]]] = field(default_factory=dict)  # the receivers again, by user
    pubs: list[Session[C]] = field(default_factory=list)
    fanout: FanOut = field(default_factory=FanOut)  # the receivers' roles, and where requests went


class Hub(Generic[C, K]):
    """Topics, their sessions and access lists, logins, and what the board does with each line.

    Limits: ``lines_per_second`` relayed per session (token bucket),
    ``sessions_per_user`` concurrent commands across a user's connections,
    ``topics_per_user`` topics a user owns (live, or with an access list).
    ``dropped`` counts lines and sessions cut off, ``refused`` sessions turned
    away, ``relayed`` lines accepted for relay (once, however many get them),
    ``delivered`` lines handed to receivers (once per receiver).  ``fan_out``:
    requests, withdraws and hellos go only to the sessions whose role reads them
    (:mod:`.fanout`); off, to every receiver, as on a broadcast board (a baseline).
    """

    def __init__(self, users: Users, *, members: dict[str, tuple[str, ...]] | None = None,
                 registry: Registry | None = None, verify_sender: bool = True,
                 lines_per_second: float = 200.0, sessions_per_user: int = 32, topics_per_user: int = 100) -> None:
        if not (lines_per_second > 0 and sessions_per_user > 0 and topics_per_user > 0):
            raise ValueError("board limits must be positive")
        self.users = users
        self.registry = registry if registry is not None else Registry()
        self.verify_sender = verify_sender
        self.lines_per_second = lines_per_second
        self.sessions_per_user, self.topics_per_user = sessions_per_user, topics_per_user
        self.dropped: collections.Counter[str] = collections.Counter()
        self.refused: collections.Counter[str] = collections.Counter()
        self.relayed = 0
        self.delivered = 0
        self.fan_out = True
        self.stopping = False  # no session may join any more
        self._members: dict[str, tuple[str, ...]] = dict(members or {})
        self._topics: dict[str, _Topic[C]] = {}
        self._sessions: dict[int, Session[C]] = {}
        self._logins: dict[C, Login] = {}
        self._slots: dict[K, str] = {}  # running commands -> their user
        self._user_slots: collections.Counter[str] = collections.Counter()
        self._serial = 0

    # -- logins

    def knows(self, user: str, key: bytes) -> bool:
        """In the users file, or joined through an invitation."""
        return self.users.allows(user, key) or self.registry.allows(user, key)

    def log_in(self, conn: C, user: str, key: bytes, wall: float) -> bool:
        """``conn`` offers ``key`` for ``user`` at ``wall`` (seconds since the epoch): may it log in?

        A known key logs in; so does any key for a name with an open invitation,
        which may then run ``join`` and nothing else.  The last successful
        call for ``conn`` is its login (paramiko asks before it checks the signature).
        """
        known = self.knows(user, key)
        if not (known or self.registry.invited(user, wall)):
            return False
        self._logins[conn] = Login(user, key, joining=not known)
        return True

    def login(self, conn: C) -> Login | None:
        return self._logins.get(conn)

    def log_out(self, conn: C) -> None:
        """``conn`` is closed (its sessions are being ended)."""
        self._logins.pop(conn, None)

    def still_allowed(self, conn: C, wall: float) -> bool:
        """Whether ``conn``'s key still opens the board (the users may have changed since it logged in)."""
        login = self._logins.get(conn)
        if login is None or login.revoked:
            return False
        return self.knows(login.user, login.key) or (login.joining and self.registry.invited(login.user, wall))

    def revoke(self, conn: C) -> bool:
        """Mark ``conn`` revoked: its sessions get nothing more.  True if the server must hang it up now
        (the first time, unless the board is stopping anyway)."""
        login = self._logins.get(conn)
        if login is None or login.revoked or self.stopping:
            return False
        login.revoked = True
        return True

    def set_users(self, users: Users, wall: float) -> list[Action]:
        """Replace the users file: connections whose key is no longer their user's are hung up."""
        self.users = users
        return [HangUp(conn) for conn in list(self._logins)
                if not self.still_allowed(conn, wall) and self.revoke(conn)]

    # -- commands and their sessions per user

    def open(self, command: K, user: str) -> bool:
        """Count a running command against ``user``'s ``sessions_per_user``; False (counted) if over."""
        if self._user_slots[user] >= self.sessions_per_user:
            self.refused["sessions-per-user"] += 1
            return False
        self._user_slots[user] += 1
        self._slots[command] = user
        return True

    def close(self, command: K) -> None:
        """Undo :meth:`open` (idempotent)."""
        user = self._slots.pop(command, None)
        if user is not None:
            self._user_slots[user] -= 1
            if not self._user_slots[user]:
                del self._user_slots[user]

    def check_command(self, conn: C, cmd: Command) -> None:
        """CommandError if ``conn`` may not run ``cmd`` at all (an invitee who has not joined yet)."""
        login = self._logins.get(conn)
        if login is None:
            raise CommandError("not authenticated")
        if login.joining and cmd.name not in ("join", "help"):
            raise CommandError(f"{login.user} is invited here but has not joined: run p2pexec join CODE")

    def command(self, conn: C, cmd: Command, wall: float) -> tuple[str, list[Action]]:
        """Run one of ``help``, ``user``, ``ls``, ``invite``, ``join``, ``members``: its output and actions.

        Raises CommandError, whose text is for the client's stderr.
        """
        self.check_command(conn, cmd)
        login = self._logins[conn]
        if cmd.name == "help":
            return HELP, []
        if cmd.name == "user":
            return login.user + "\n", []
        if cmd.name == "ls":
            return self.ls(login.user), []
        if cmd.name in ("invite", "join", "members"):
            return self._membership(login, cmd, wall)
        raise CommandError(f"{cmd.name} is not run by the hub")

    def _membership(self, login: Login, cmd: Command, wall: float) -> tuple[str, list[Action]]:
        """``invite``, ``join`` and ``members``: see :mod:`.registry`."""
        cluster, owner, user, key = cmd.topic, cmd.owner, login.user, login.key
        assert cluster is not None
        if cmd.name == "join":
            self.registry.join(cluster, user, key, cmd.args[0], wall)
            login.joining = False
            return self.registry.view(cluster), [Persist("registry")]
        if cmd.name == "invite" or cmd.args:
            if user != owner or not self.users.allows(user, key):  # a users-file key, not an invitation's
                raise CommandError(f"only {owner}, with a key in this board's users file, may change who is "
                                   f"in {cluster}")
        elif not self.allowed(user, cluster, key):
            raise CommandError(f"access denied to {cluster}")
        if cmd.name == "invite":
            invitee, invitation_key = cmd.args
            if not valid_username(invitee):
                raise CommandError(f"invalid user name {invitee!r}")
            self.registry.invite(cluster, invitee, invitation_key, wall)
            return f"{invitee} may join {cluster} once within {INVITE_DAYS} days\n", [Persist("registry")]
        if cmd.args:
            try:
                text = base64.b64decode(cmd.args[0], validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                raise CommandError("the member list must be base64 of its JSON") from None
            try:
                self._check_room(cluster)
            except Refused as exc:
                raise CommandError(str(exc)) from None
            signed = self.registry.set_list(cluster, key, text)
            actions: list[Action] = [Persist("registry")]
            actions += self.set_members(cluster, sorted(signed.members))
            return f"member list of {cluster} is version {signed.version}\n", actions
        return self.registry.view(cluster), []

    # -- access lists

    def allowed(self, user: str, topic: str, key: bytes | None = None) -> bool:
        """By name, as pico does; and a key that only an invitation registered serves only its own clusters."""
        owner = topic.split("/", 1)[0]
        if owner == PUBLIC:
            return True
        if not (user == owner or user in self._members.get(topic, ())):
            return False
        if key is None or self.users.allows(user, key):
            return True
        return self.registry.allows_in(topic, user, key)

    def members(self, cluster: str) -> tuple[str, ...] | None:
        """The access list of ``cluster``, or None if its owner never set one."""
        return self._members.get(cluster)

    def members_snapshot(self) -> dict[str, list[str]]:
        """Every access list, to save."""
        return {k: list(v) for k, v in sorted(self._members.items())}

    def set_members(self, cluster: str, members: Iterable[str]) -> list[Action]:
        """Set who besides its owner may join ``cluster`` (``owner/name``); ValueError if not valid.

        Sessions of users no longer listed are ended with ``access denied``.
        """
        members = list(members)
        if not valid_topic(cluster) or cluster.startswith(PUBLIC + "/"):
            raise ValueError(f"invalid cluster {cluster!r}: expected OWNER/NAME, not public")
        bad = [m for m in members if not valid_username(m)]
        if bad:
            raise ValueError(f"invalid user names {bad}")
        new = tuple(dict.fromkeys(members))
        if self._members.get(cluster) == new:
            return []
        self._members[cluster] = new
        actions: list[Action] = [Persist("clusters")]
        topic = self._topics.get(cluster)
        for s in (topic.receivers + topic.pubs) if topic else []:
            if not s.ending and not self.allowed(s.user, cluster, s.key):
                s.ending = True
                actions.append(End(s.id, 1, "access denied"))
        return actions

    def _check_room(self, name: str) -> None:
        """Refuse a new topic (live or with an access list) to an owner who has topics_per_user already."""
        owner = name.split("/", 1)[0]
        if owner == PUBLIC or name in self._topics or name in self._members:
            return  # public topics live only as long as their sessions, which sessions_per_user bounds
        owned = {n for n in (*self._topics, *self._members) if n.split("/", 1)[0] == owner}
        if len(owned) >= self.topics_per_user:
            self.refused["topics-per-user"] += 1
            raise Refused(f"{owner} has {len(owned)} topics on this board, the most it keeps for one user "
                          f"(topics_per_user); use one of them (see: ls)")

    # -- sessions on topics

    def join(self, conn: C, cmd: Command, wall: float, now: float) -> tuple[Session[C], list[Action]]:
        """Check access for a pub, sub or pipe (setting the access list if its owner gave one) and add it.

        ``wall``: seconds since the epoch; ``now``: monotonic seconds (its rate limit starts there).
        Raises Refused; the actions are those of an access list set on the way, refused or not.
        """
        if cmd.name not in STREAMS or cmd.topic is None:
            raise ValueError(f"{cmd.name} does not join a topic")
        self._serial += 1
        login = self._logins.get(conn)
        if login is None:
            raise Refused("not authenticated")
        user, name = login.user, cmd.topic
        actions: list[Action] = []
        if cmd.access is not None:
            if user != cmd.owner:
                raise Refused(f"only {cmd.owner} can set the access list of {name}")
            self._check_room(name)
            actions += self.set_members(name, cmd.access)
        try:
            if self.stopping:
                raise Refused("board is shutting down")
            self._check_room(name)
            if not self.still_allowed(conn, wall):  # set_users() ran since the command began
                raise Refused("access revoked")
            if not self.allowed(user, name, login.key):
                raise Refused("access denied")
        except Refused as exc:
            raise Refused(str(exc), actions) from None
        session = Session(self._serial, conn, user, login.key, cmd, Bucket(self.lines_per_second, now))
        topic = self._topics.setdefault(name, _Topic())
        if cmd.name == "pub":
            topic.pubs.append(session)
            for r in topic.receivers:
                r.saw_publisher = True
        else:
            session.saw_publisher = bool(topic.pubs)
            topic.receivers.append(session)
            topic.by_user.setdefault(user, []).append(session)
            topic.fanout.joined(session.id)
        self._sessions[session.id] = session
        return session, actions

    def leave(self, session_id: int) -> list[Action]:
        """Take a session off its topic (idempotent): it gets no more lines, and may end plain subs."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return []
        session.ending = True
        topic = self._topics.get(session.topic)
        if topic is None:
            return []
        actions: list[Action] = []
        for group in (topic.pubs, topic.receivers, topic.by_user.get(session.user, [])):
            if session in group:
                group.remove(session)
        if not topic.by_user.get(session.user, True):
            del topic.by_user[session.user]
        topic.fanout.left(session.id)
        if session.cmd.name == "pub" and not topic.pubs:
            for r in topic.receivers:  # last publisher gone: plain subs end
                if r.cmd.name == "sub" and not r.cmd.keep and r.saw_publisher:
                    actions.append(EndOutput(r.id))
        if not topic.pubs and not topic.receivers:
            del self._topics[session.topic]
        return actions

    def session(self, session_id: int) -> Session[C] | None:
        return self._sessions.get(session_id)

    def has_receivers(self, topic: str) -> bool:
        """pub -b waits for this: a sub or pipe on ``topic``."""
        t = self._topics.get(topic)
        return t is not None and bool(t.receivers)

    def sender(self, session_id: int) -> Sender | None:
        """The view a line of this session is checked against (:meth:`Sender.check`), as of now;
        None once it has left."""
        s = self._sessions.get(session_id)
        if s is None:
            return None
        cluster = s.topic if s.topic in self._members else None
        return Sender(s.user, s.key, cluster, self.verify_sender)

    def relay(self, session_id: int, checked: Checked, now: float) -> Relay:
        """Where ``checked.line`` from this session goes, in one order for all; ``now``: monotonic seconds.

        A topic with an access list is a cluster's: only the cluster's messages
        signed by the session's own user and key go out there (see
        :func:`..protocol.messages.route`); elsewhere, lines that are not messages too.  A message
        addressed to one member (an offer, a decline) goes to that member's
        sessions alone: the others would drop it anyway, and sending every
        offer to everyone grows with the square of the cluster.  Requests,
        withdraws and hellos go to the sessions whose role needs them
        (:mod:`.fanout`): a request to a bounded number of workers.  A session the
        hub is ending, or whose connection was revoked, neither sends nor receives.
        """
        s = self._sessions.get(session_id)
        if s is None or not self._live(s):
            return Relay()
        if not s.bucket.take(now):
            self.dropped["rate-limit"] += 1
            s.ending = True
            return Relay(end=End(s.id, 1, f"rate limit exceeded ({s.bucket.rate:g} lines/s), disconnecting"))
        sender = self.sender(session_id)
        assert sender is not None
        if checked.sender != sender:  # the access list changed since the check: check again
            checked = sender.check(checked.line)
        verdict = checked.route
        if verdict.refusal is not None:
            self.dropped[verdict.refusal] += 1
            return Relay(refusal=verdict.refusal)
        self.relayed += 1
        to, msg = verdict.to, verdict.message
        topic = self._topics[s.topic]
        if not self.fan_out:
            msg = None
        if to is None and msg is not None and msg.type in ("request", "withdraw"):
            fanout = topic.fanout
            if msg.type == "request":
                chosen = fanout.request(s.id, msg.body, msg.exp - msg.ts, now)
            else:
                chosen = fanout.withdraw(s.id, msg.body.get("req"), now)
            echo = [s.id] if s.cmd.replay else []
            ids = (*echo, *chosen, *(sid for sid in fanout.unknown if sid != s.id))
            return self._deliver(tuple(sid for sid in ids if self._live(self._sessions[sid])))
        if to is not None:  # its addressee's sessions, found without going through the whole topic
            them = [*topic.by_user.get(to, ()), *((s,) if s.cmd.name != "pub" and s.user != to else ())]
            return self._deliver(tuple(r.id for r in sorted(them, key=lambda r: r.id)  # ids: the join order
                                       if self._live(r) and (r is not s or s.cmd.replay)))
        skips: frozenset[str] = frozenset()
        if msg is not None and msg.type == "hello":
            topic.fanout.hello(s.id, msg.body)
            skips = topic.fanout.hello_skips(msg.body.get("role"))
        return self._deliver(tuple(
            r.id for r in topic.receivers
            if self._live(r) and (r is not s or s.cmd.replay) and (r is s or topic.fanout.role(r.id) not in skips)))

    def _deliver(self, to: tuple[int, ...]) -> Relay:
        self.delivered += len(to)
        return Relay(to=to)

    def _live(self, s: Session[C]) -> bool:
        login = self._logins.get(s.conn)
        return not s.ending and login is not None and not login.revoked

    # -- views

    def counts(self, topic: str) -> dict[str, int]:
        """How many pub, sub and pipe sessions ``topic`` has."""
        t = self._topics.get(topic)
        if t is None:
            return {"pub": 0, "sub": 0, "pipe": 0}
        subs = sum(1 for s in t.receivers if s.cmd.name == "sub")
        return {"pub": len(t.pubs), "sub": subs, "pipe": len(t.receivers) - subs}

    def ls(self, user: str) -> str:
        """``user``'s topics, live or with an access list, in pico.sh's format."""
        names = sorted({n for n in (*self._topics, *self._members) if n.split("/", 1)[0] == user})
        if not names:
            return "no pubsub channels found\n"
        lines = ["Channel Information"]
        for name in names:
            members = self._members.get(name)
            acl = f" (Access List: {', '.join(members)})" if members is not None else ""
            lines.append(f"- {name}:{acl}")
            topic = self._topics.get(name) or _Topic()
            groups: Iterable[tuple[str, list[Session[C]]]] = (
                ("Pubs", topic.pubs),
                ("Subs", [s for s in topic.receivers if s.cmd.name == "sub"]),
                ("Pipes", [s for s in topic.receivers if s.cmd.name == "pipe"]))
            for label, group in groups:
                if group:
                    lines.append(f"  {label}:")
                    lines += [f"  - {s.client_id}" for s in group]
        return "\n".join(lines) + "\n"
