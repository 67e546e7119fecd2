"""Where one line goes: the sender check it passes first, and the receivers of its topic it reaches.

A topic with an access list is a cluster's: only the cluster's messages
signed by the session's own user and key go out there (see
:func:`..protocol.messages.route`); elsewhere, lines that are not messages too.
The check is costly (a signature), so the server runs :meth:`Sender.check`
outside its lock, against a view of the sender (:class:`Sender`) the hub gave
it; the hub checks again only if that view changed meanwhile.

Then :func:`receivers` picks the sessions, in one order for all.  A message
addressed to one member (an offer, a decline) goes to that member's sessions
alone: the others would drop it anyway, and sending every offer to everyone
grows with the square of the cluster.  Requests, withdraws and hellos go to the
sessions whose role needs them (:mod:`.fanout`): a request to a bounded number
of workers.  Pure.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from ..protocol.messages import Route, route
from .topics import Session, Topic

C = TypeVar("C", bound=Hashable)  # how the server names a connection


@dataclass(frozen=True)
class Sender:
    """What the sender check of one session depends on, as of one moment (see :meth:`.Hub.sender`)."""

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


def receivers(topic: Topic[C], s: Session[C], verdict: Route, *, fan_out: bool, now: float,
              live: Callable[[Session[C]], bool], sessions: Mapping[int, Session[C]]) -> tuple[int, ...]:
    """The ids of the sessions of ``topic`` that get a line of ``s`` that passed with ``verdict``, in order.

    ``live``: whether a session may still receive; ``sessions``: every session by id; ``fan_out`` off, every
    receiver gets requests, withdraws and hellos, as on a broadcast board (a baseline).  Tells the topic's
    :class:`.FanOut` of the requests and hellos that pass.
    """
    to, msg = verdict.to, verdict.message
    if not fan_out:
        msg = None
    if to is None and msg is not None and msg.type in ("request", "withdraw"):
        fanout = topic.fanout
        if msg.type == "request":
            chosen = fanout.request(s.id, msg.body, msg.exp - msg.ts, now)
        else:
            chosen = fanout.withdraw(s.id, msg.body.get("req"), now)
        echo = [s.id] if s.cmd.replay else []
        ids = (*echo, *chosen, *(sid for sid in fanout.unknown if sid != s.id))
        return tuple(sid for sid in ids if live(sessions[sid]))
    if to is not None:  # its addressee's sessions, found without going through the whole topic
        them = [*topic.by_user.get(to, ()), *((s,) if s.cmd.name != "pub" and s.user != to else ())]
        return tuple(r.id for r in sorted(them, key=lambda r: r.id)  # ids: the join order
                     if live(r) and (r is not s or s.cmd.replay))
    skips: frozenset[str] = frozenset()
    if msg is not None and msg.type == "hello":
        topic.fanout.hello(s.id, msg.body)
        skips = topic.fanout.hello_skips(msg.body.get("role"))
    return tuple(r.id for r in topic.receivers
                 if live(r) and (r is not s or s.cmd.replay) and (r is s or topic.fanout.role(r.id) not in skips))
