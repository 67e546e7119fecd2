"""The board's live topics and the pub, sub and pipe sessions on them, in the order they joined.

A topic exists while it has sessions.  Its receivers (subs and pipes) are
kept in join order, which is the order every line reaches them, and again by
user, so that a line addressed to one member finds that member's sessions
without a walk through the topic.  Each topic also holds its :class:`.FanOut`
(the receivers' roles).  Who may join, and where a line goes, the hub
(:mod:`.hub`) and :mod:`.routing` decide; this is their bookkeeping.  Pure.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, KeysView, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .actions import EndOutput
from .caps import Bucket
from .commands import Command
from .fanout import FanOut

C = TypeVar("C", bound=Hashable)  # how the server names a connection

STREAMS = ("pub", "sub", "pipe")


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
class Topic(Generic[C]):
    receivers: list[Session[C]] = field(default_factory=list)  # subs and pipes, in the order they joined
    by_user: dict[str, list[Session[C]]] = field(default_factory=dict)  # the receivers again, by user
    pubs: list[Session[C]] = field(default_factory=list)
    fanout: FanOut = field(default_factory=FanOut)  # the receivers' roles, and where requests went


class Topics(Generic[C]):
    """Every live topic by name, and every session on one by id."""

    def __init__(self) -> None:
        self._topics: dict[str, Topic[C]] = {}
        self._sessions: dict[int, Session[C]] = {}

    @property
    def names(self) -> KeysView[str]:
        """The names of the live topics (a view)."""
        return self._topics.keys()

    @property
    def sessions(self) -> Mapping[int, Session[C]]:
        """The sessions on a topic, by id (a view)."""
        return self._sessions

    def get(self, name: str) -> Topic[C] | None:
        return self._topics.get(name)

    def session(self, session_id: int) -> Session[C] | None:
        return self._sessions.get(session_id)

    def add(self, session: Session[C]) -> None:
        """Put ``session`` on its topic, which it creates if it is the first."""
        topic = self._topics.setdefault(session.topic, Topic())
        if session.cmd.name == "pub":
            topic.pubs.append(session)
            for r in topic.receivers:
                r.saw_publisher = True
        else:
            session.saw_publisher = bool(topic.pubs)
            topic.receivers.append(session)
            topic.by_user.setdefault(session.user, []).append(session)
            topic.fanout.joined(session.id)
        self._sessions[session.id] = session

    def remove(self, session_id: int) -> list[EndOutput]:
        """Take a session off its topic (idempotent): it gets no more lines, and may end plain subs."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return []
        session.ending = True
        topic = self._topics.get(session.topic)
        if topic is None:
            return []
        actions: list[EndOutput] = []
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

    def has_receivers(self, name: str) -> bool:
        """pub -b waits for this: a sub or pipe on topic ``name``."""
        t = self._topics.get(name)
        return t is not None and bool(t.receivers)

    def counts(self, name: str) -> dict[str, int]:
        """How many pub, sub and pipe sessions topic ``name`` has."""
        t = self._topics.get(name)
        if t is None:
            return {"pub": 0, "sub": 0, "pipe": 0}
        subs = sum(1 for s in t.receivers if s.cmd.name == "sub")
        return {"pub": len(t.pubs), "sub": subs, "pipe": len(t.receivers) - subs}

    def ls(self, user: str, access: Mapping[str, tuple[str, ...]]) -> str:
        """``user``'s topics, live or with an access list in ``access``, in pico.sh's format."""
        names = sorted({n for n in (*self._topics, *access) if n.split("/", 1)[0] == user})
        if not names:
            return "no pubsub channels found\n"
        lines = ["Channel Information"]
        for name in names:
            members = access.get(name)
            acl = f" (Access List: {', '.join(members)})" if members is not None else ""
            lines.append(f"- {name}:{acl}")
            topic = self._topics.get(name) or Topic()
            groups: Iterable[tuple[str, list[Session[C]]]] = (
                ("Pubs", topic.pubs),
                ("Subs", [s for s in topic.receivers if s.cmd.name == "sub"]),
                ("Pipes", [s for s in topic.receivers if s.cmd.name == "pipe"]))
            for label, group in groups:
                if group:
                    lines.append(f"  {label}:")
                    lines += [f"  - {s.client_id}" for s in group]
        return "\n".join(lines) + "\n"
