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

The hub composes pure pieces, each with one job, and keeps the rules that
span them (who may join, what a revoked login or a changed access list ends)::

    .logins    who each connection logged in as; whether its key still opens the board
    .access    the access lists, and the membership commands that change them
    .caps      lines a second per session, sessions and topics per user
    .topics    the live topics and their sessions, in join order
    .routing   the sender check, and which receivers get a line
    .actions   what the hub answers (End, EndOutput, HangUp, Persist, Relay, Refused)
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

from .access import AccessLists
from .actions import Action, End, EndOutput, HangUp, Persist, Refused, Relay
from .caps import Bucket, Caps
from .commands import HELP, Command, CommandError
from .logins import Login, Logins, Users
from .registry import Registry
from .routing import Checked, Sender, receivers
from .topics import STREAMS, Session, Topics

__all__ = ["Action", "Bucket", "Checked", "End", "EndOutput", "HangUp", "Hub", "Login", "Persist", "Refused",
           "Relay", "STREAMS", "Sender", "Session", "Users"]

C = TypeVar("C", bound=Hashable)  # how the server names a connection
K = TypeVar("K", bound=Hashable)  # how the server names a running command (its channel)


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
        self.registry = registry if registry is not None else Registry()
        self.verify_sender = verify_sender
        self.lines_per_second = lines_per_second
        self.dropped: collections.Counter[str] = collections.Counter()
        self.refused: collections.Counter[str] = collections.Counter()
        self.relayed = 0
        self.delivered = 0
        self.fan_out = True
        self.stopping = False  # no session may join any more
        self._logins: Logins[C] = Logins(users, self.registry)
        self._access = AccessLists(self._logins, members)
        self._caps: Caps[K] = Caps(sessions_per_user, topics_per_user)
        self._topics: Topics[C] = Topics()
        self._serial = 0

    @property
    def users(self) -> Users:
        return self._logins.users

    @property
    def sessions_per_user(self) -> int:
        return self._caps.sessions_per_user

    # -- logins

    def knows(self, user: str, key: bytes) -> bool:
        """In the users file, or joined through an invitation."""
        return self._logins.knows(user, key)

    def log_in(self, conn: C, user: str, key: bytes, wall: float) -> bool:
        """``conn`` offers ``key`` for ``user`` at ``wall`` (seconds since the epoch): may it log in?
        See :meth:`.Logins.log_in`."""
        return self._logins.log_in(conn, user, key, wall)

    def login(self, conn: C) -> Login | None:
        return self._logins.get(conn)

    def log_out(self, conn: C) -> None:
        """``conn`` is closed (its sessions are being ended)."""
        self._logins.log_out(conn)

    def still_allowed(self, conn: C, wall: float) -> bool:
        """Whether ``conn``'s key still opens the board (the users may have changed since it logged in)."""
        return self._logins.still_allowed(conn, wall)

    def revoke(self, conn: C) -> bool:
        """Mark ``conn`` revoked: its sessions get nothing more.  True if the server must hang it up now
        (the first time, unless the board is stopping anyway)."""
        return not self.stopping and self._logins.revoke(conn)

    def set_users(self, users: Users, wall: float) -> list[Action]:
        """Replace the users file: connections whose key is no longer their user's are hung up."""
        self._logins.users = users
        return [HangUp(conn) for conn in self._logins.connections()
                if not self.still_allowed(conn, wall) and self.revoke(conn)]

    # -- commands and their sessions per user

    def open(self, command: K, user: str) -> bool:
        """Count a running command against ``user``'s ``sessions_per_user``; False (counted) if over."""
        if not self._caps.open(command, user):
            self.refused["sessions-per-user"] += 1
            return False
        return True

    def close(self, command: K) -> None:
        """Undo :meth:`open` (idempotent)."""
        self._caps.close(command)

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
        login = self._logins.get(conn)
        assert login is not None
        if cmd.name == "help":
            return HELP, []
        if cmd.name == "user":
            return login.user + "\n", []
        if cmd.name == "ls":
            return self.ls(login.user), []
        if cmd.name in ("invite", "join", "members"):
            out, saved, members = self._access.membership(login, cmd, wall, self._check_room)
            actions: list[Action] = [Persist("registry")] if saved else []
            if members is not None:
                assert cmd.topic is not None
                actions += self.set_members(cmd.topic, members)
            return out, actions
        raise CommandError(f"{cmd.name} is not run by the hub")

    # -- access lists

    def allowed(self, user: str, topic: str, key: bytes | None = None) -> bool:
        """By name, as pico does; and a key that only an invitation registered serves only its own clusters."""
        return self._access.allowed(user, topic, key)

    def members(self, cluster: str) -> tuple[str, ...] | None:
        """The access list of ``cluster``, or None if its owner never set one."""
        return self._access.get(cluster)

    def members_snapshot(self) -> dict[str, list[str]]:
        """Every access list, to save."""
        return self._access.snapshot()

    def set_members(self, cluster: str, members: Iterable[str]) -> list[Action]:
        """Set who besides its owner may join ``cluster`` (``owner/name``); ValueError if not valid.

        Sessions of users no longer listed are ended with ``access denied``.
        """
        if not self._access.set(cluster, members):
            return []
        actions: list[Action] = [Persist("clusters")]
        topic = self._topics.get(cluster)
        for s in (topic.receivers + topic.pubs) if topic else []:
            if not s.ending and not self.allowed(s.user, cluster, s.key):
                s.ending = True
                actions.append(End(s.id, 1, "access denied"))
        return actions

    def _check_room(self, name: str) -> None:
        """Refuse a new topic (live or with an access list) to an owner who has topics_per_user already."""
        refusal = self._caps.room(name, self._topics.names, self._access.lists)
        if refusal is not None:
            self.refused["topics-per-user"] += 1
            raise Refused(refusal)

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
        self._topics.add(session)
        return session, actions

    def leave(self, session_id: int) -> list[Action]:
        """Take a session off its topic (idempotent): it gets no more lines, and may end plain subs."""
        return list(self._topics.remove(session_id))

    def session(self, session_id: int) -> Session[C] | None:
        return self._topics.session(session_id)

    def has_receivers(self, topic: str) -> bool:
        """pub -b waits for this: a sub or pipe on ``topic``."""
        return self._topics.has_receivers(topic)

    def sender(self, session_id: int) -> Sender | None:
        """The view a line of this session is checked against (:meth:`Sender.check`), as of now;
        None once it has left."""
        s = self._topics.session(session_id)
        if s is None:
            return None
        cluster = s.topic if s.topic in self._access.lists else None
        return Sender(s.user, s.key, cluster, self.verify_sender)

    def relay(self, session_id: int, checked: Checked, now: float) -> Relay:
        """Where ``checked.line`` from this session goes, in one order for all; ``now``: monotonic seconds.

        The sender's rate limit first, then the sender check (again, if the access list changed since
        ``checked`` was made), then :func:`.routing.receivers`.  A session the hub is ending, or whose
        connection was revoked, neither sends nor receives.
        """
        s = self._topics.session(session_id)
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
        topic = self._topics.get(s.topic)
        assert topic is not None
        to = receivers(topic, s, verdict, fan_out=self.fan_out, now=now, live=self._live,
                       sessions=self._topics.sessions)
        self.delivered += len(to)
        return Relay(to=to)

    def _live(self, s: Session[C]) -> bool:
        return not s.ending and self._logins.live(s.conn)

    # -- views

    def counts(self, topic: str) -> dict[str, int]:
        """How many pub, sub and pipe sessions ``topic`` has."""
        return self._topics.counts(topic)

    def ls(self, user: str) -> str:
        """``user``'s topics, live or with an access list, in pico.sh's format."""
        return self._topics.ls(user, self._access.lists)
