"""The client's board conversation, without I/O: requests per need, which offers to take, who is online,
who cannot serve us and why (for the no-worker warning), bans and dial backoff.

:class:`Matchmaker` is the board half of :class:`~.client_core.ClientCore`, which supplies the demand
(:meth:`Matchmaker.wanted`) and takes the offers (:meth:`Matchmaker.accept`).
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

from .client_state import SAY_HELLO, Action, Post, SchedulerOptions
from .protocol import messages
from .protocol.matching import REVISION, python_compatible, revision_in, should_request
from .protocol.observers import AnswerObservers
from .protocol.reach import DialBackoff
from .protocol.resources import ANY, Need, Resources, unmet
from .protocol.unusable import Sighting, Unusable, describe

if TYPE_CHECKING:
    from .fitting import Fitting

log = logging.getLogger("p2pexec.client")

PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
REQUEST_TTL = 10.0
REQUEST_EVERY = 2.0
PROBE_SLOTS = 4096  # a request that asks every worker for all it has, to count slots
REMEMBER_WORKERS = 90.0  # a worker not heard from for this long (hello every 30 s) is not online


class _Ask:
    """The board conversation for one need: its own request id, and when we last asked for how many."""

    def __init__(self, req: str) -> None:
        self.req = req
        self.last_request = -1e9
        self.last_asked = 0


class Matchmaker:
    def __init__(self, me: str, cluster: str, options: SchedulerOptions, fitting: Fitting,
                 python: str = PYTHON) -> None:
        self.me = me
        self.cluster = cluster
        self.options = options
        self.fitting = fitting  # which workers have the packages tasks refer to
        self.python = python
        self.request_id = messages.new_id()
        self.offered: dict[str, tuple[int, float]] = {}  # peer -> slots it offered us last, and when
        self.banned: dict[str, str] = {}  # member -> how a worker of theirs broke the protocol
        self.backoff = DialBackoff()  # workers that could not be reached, by peer id
        self.unreachable: dict[str, str] = {}  # worker (member/machine) -> why it could not be reached (for errors)
        self._asks: dict[Need, _Ask] = {ANY: _Ask(self.request_id)}  # one request id per need
        self._workers: dict[str, tuple[str, float]] = {}  # peer -> member, when last heard: who is online
        self._unusable = Unusable(python)  # workers online that we cannot use, and why
        self._observers = AnswerObservers()

    # supplied by ClientCore
    def wanted(self, need: Need) -> int:
        raise NotImplementedError

    def needs_waiting(self) -> list[Need]:
        raise NotImplementedError

    def accept(self, offer: messages.Message, need: Need, now: float) -> list[Action]:
        raise NotImplementedError

    def useful(self, need: Need, peer: str) -> bool:
        raise NotImplementedError

    # -- what the board says ---------------------------------------------------------------
    def on_message(self, msg: messages.Message, now: float) -> list[Action]:
        """A verified board message from a member (relay announcements are the adapter's)."""
        done: list[Action] = [SAY_HELLO] if self._observers.due(msg, now) else []
        if msg.type == "offer":
            done += self._on_offer(msg, now)
        elif msg.type == "hello" and msg["role"] == "worker":
            node = msg.body.get("node")
            arrived = not (isinstance(node, str) and node in self._workers)
            if self._note_unusable(msg, now) is None and isinstance(node, str):
                self._workers[node] = (msg.sender, now)
            if arrived:  # a worker arrived: ask again right away (a known one keeps our request and offers when free)
                done += self.reannounce(now)
        elif msg.type == "decline" and self._need_of(msg["req"]) is not None and msg["to"] == self.me:
            if msg["why"] in ("python", "worker-allow"):
                self._unusable.note(msg.sender, msg["why"], str(msg.body.get("py", "?")), now)
            elif msg["why"] == "version":
                self._unusable.note(msg.sender, "version", str(revision_in(msg.body) or "?"), now)
            elif msg["why"] in ("resources", "requires"):
                self._unusable.note(msg.sender, msg["why"], str(msg.body.get("detail", "?")), now)
        elif msg.type == "bye" and msg["role"] == "worker" and isinstance(msg.body.get("node"), str):
            self._workers.pop(msg["node"], None)
        return done

    def _need_of(self, req: str) -> Need | None:
        """The need whose request id is ``req``, if it is one of ours."""
        return next((need for need, ask in self._asks.items() if ask.req == req), None)

    def _note_unusable(self, msg: messages.Message, now: float) -> Sighting | None:
        """Note why the worker that sent ``msg`` (a hello, an offer) cannot serve us, if it cannot."""
        worker, revision, python = msg.sender, revision_in(msg.body), msg.body.get("py")
        if revision != REVISION:
            why = Sighting(worker, "version", str(revision or "?"))
        elif worker in self.banned:  # by member: a new peer id (a restarted worker) does not evade it
            why = Sighting(worker, "banned", self.banned[worker])
        elif self.options.allow is not None and worker not in self.options.allow:
            why = Sighting(worker, "client-allow")
        elif isinstance(python, str) and not python_compatible(self.python, python):
            why = Sighting(worker, "python", python)
        else:
            return None
        self._unusable.note(why.member, why.reason, why.detail, now)
        return why

    def _on_offer(self, msg: messages.Message, now: float) -> list[Action]:
        need = self._need_of(msg["req"])
        if need is None or msg["to"] != self.me:
            return []
        unusable = self._note_unusable(msg, now)
        if unusable is not None:
            log.debug("ignoring an offer from %s", describe([unusable], self.python, self.me))
            return []
        if not self.backoff.ready(msg["peer"], now):
            log.debug("ignoring an offer from %s: it could not be reached, next try later", msg.sender)
            return []
        resources = _resources_in(msg)
        if need != ANY and (resources is None or unmet(need, resources) is not None):
            log.debug("ignoring an offer from %s: it cannot meet %s", msg.sender, need)
            return []
        self._workers[msg["peer"]] = (msg.sender, now)
        self.fitting.heard(msg["peer"], msg.sender, msg.body.get("dists"), now)
        if not self.useful(need, msg["peer"]):
            log.debug("ignoring an offer from %s: it lacks packages our tasks use", msg.sender)
            return []
        return self.accept(msg, need, now)

    # -- what we ask -------------------------------------------------------------------------
    def ask_soon(self, need: Need) -> None:
        """Ask the board for workers of ``need`` at the next chance, not after REQUEST_EVERY."""
        self._asks[need].last_request = -1e9

    def reannounce(self, now: float) -> list[Action]:
        for ask in self._asks.values():
            ask.last_request = -1e9
        return self.maybe_request(now)

    def maybe_request(self, now: float) -> list[Action]:
        """Requests for the needs that want more slots (at once when demand doubled), withdrawals for those
        that want none any more."""
        for need in self.needs_waiting():
            if need not in self._asks:
                self._asks[need] = _Ask(messages.new_id())
        dists = {"dists": sorted(self.fitting.asking)} if self.fitting.asking else {}
        done: list[Action] = []
        for need, ask in self._asks.items():
            wanted = self.wanted(need)
            if not wanted:
                if ask.last_asked:  # we asked and want no more: workers stop keeping slots for us
                    done.append(Post("withdraw", {"req": ask.req}, REQUEST_TTL))
                ask.last_asked = 0
            elif should_request(wanted, ask.last_asked, now - ask.last_request, REQUEST_EVERY):
                ask.last_request, ask.last_asked = now, wanted
                needs = {"need": need.to_json()} if need != ANY else {}
                done.append(Post("request", {"req": ask.req, "client": self.request_id, "n": wanted,
                                             "py": self.python, "rev": REVISION, **needs, **dists}, REQUEST_TTL))
        return done

    def probe(self) -> Post:
        """Ask the cluster who has slots, leasing nothing: the offers land in :attr:`offered`."""
        return Post("request", {"req": self.request_id, "n": PROBE_SLOTS, "py": self.python, "rev": REVISION,
                                "probe": True}, REQUEST_TTL)

    # -- who can serve us ----------------------------------------------------------------------
    def online(self, now: float) -> list[str]:
        """The peers of workers heard from lately that we may use (forgetting the others)."""
        self._workers = {p: seen for p, seen in self._workers.items() if now - seen[1] < REMEMBER_WORKERS}
        self.fitting.forget(now)
        return [peer for peer, (member, _) in self._workers.items()
                if member not in self.banned and (self.options.allow is None or member in self.options.allow)]

    def ban(self, member: str, why: str) -> None:
        """A worker of ``member`` broke the protocol: use none of theirs again."""
        self.banned[member] = why

    def dial_failed(self, label: str, peer: str, why: str, now: float) -> tuple[float, bool]:
        """That worker (``member/machine``) could not be reached: (seconds until its offers count again, the
        first failure?)."""
        self.unreachable[label] = why
        return self.backoff.failed(peer, now)

    def dial_reached(self, label: str, peer: str) -> bool:
        """That worker was reached; True if it had failed before."""
        self.unreachable.pop(label, None)
        return self.backoff.succeeded(peer)

    def sightings(self, now: float) -> list[Sighting]:
        return self._unusable.current(now) + [Sighting(user, "unreachable", why)
                                              for user, why in sorted(self.unreachable.items())]

    def starving_hint(self, now: float) -> str:
        """Which workers are online but unusable, why and what to do; else the command a friend must run."""
        run = f"p2pexec-worker --cluster {self.cluster}{self.options.board_hint}"
        sightings = self.sightings(now)
        if not sightings:
            return f"a member must run: {run}"
        relay = (". If they sit behind home routers, the board or a relay must run a relay "
                 "(p2pexec board does by default; else p2pexec relay)") if self.unreachable else ""
        return (f"workers online but unusable: {describe(sightings, self.python, self.me)}{relay}; "
                f"or a member runs a worker this client can use: {run}")


def _resources_in(msg: messages.Message) -> Resources | None:
    """What an offer's worker advertises (None from a worker too old to say, or garbled)."""
    try:
        return Resources.from_json(msg.body.get("res"))
    except (ValueError, TypeError):
        return None
