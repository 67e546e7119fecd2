"""``p2pexec status``: who is on a cluster's board right now, once or live (``--watch``).

The board has no history, so the status command joins with an ``observer``
hello; workers and clients answer with their own hello, which carries their
load (slots, cores, memory, Python; queued, running, done and failed tasks).
Whatever arrives within the collection window is the answer; a watch asks
again every second.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from typing import Any

from .board.client import BoardSession
from .config import Participant
from .protocol import messages
from .protocol.matching import REVISION, revision_in
from .protocol.observers import ANSWER_AT_MOST_EVERY
from .protocol.resources import Resources, format_size

OBSERVER_HELLO_TTL = 30.0
FORGET_AFTER_ROUNDS = 3
MAX_NODES = 4096  # nodes a status view keeps; a flood of made-up node ids cannot grow it further


def summarize(hellos: list[messages.Message]) -> dict[str, list[dict[str, Any]]]:
    """The latest hello of each node, grouped by role (pure)."""
    latest: dict[tuple[str, str], messages.Message] = {}
    for msg in hellos:
        key = (msg.sender, str(msg.body.get("node", msg.id)))
        if msg.body.get("role") in ("worker", "client") and (key not in latest or latest[key].ts <= msg.ts):
            latest[key] = msg
    out: dict[str, list[dict[str, Any]]] = {"workers": [], "clients": []}
    for (user, node), msg in sorted(latest.items()):
        entry = {"user": user, "node": node, **{k: v for k, v in msg.body.items() if k not in ("role", "node")}}
        out["workers" if msg["role"] == "worker" else "clients"].append(entry)
    return out


class Observer:
    """An observer's session on the board: asks every node to answer, keeps each node's latest hello.

    Joining asks already (the join line is an observer hello); :meth:`ask`
    asks again.  Nodes answer at most every :data:`ANSWER_AT_MOST_EVERY`
    seconds, whoever asks, so a watch cannot make them flood.
    """

    def __init__(self, who: Participant, **session_options: Any) -> None:
        self.who = who
        self._lock = threading.Lock()
        self._latest: dict[tuple[str, str], tuple[float, messages.Message]] = {}  # node -> (received, hello)
        self._session = BoardSession(who.board, who.identity, who.cluster,
                                     inbox=messages.Inbox(who.cluster, who.keyring), on_message=self._on_message,
                                     make_hello=self._hello, **session_options)

    def _hello(self) -> bytes:
        return messages.encode(self.who.identity, self.who.cluster, "hello", {"role": "observer"},
                               now=time.time(), ttl=OBSERVER_HELLO_TTL)

    def _on_message(self, msg: messages.Message) -> None:
        if msg.type == "hello" and msg.body.get("role") in ("worker", "client"):
            key = (msg.sender, str(msg.body.get("node", msg.id)))
            with self._lock:
                if len(self._latest) < MAX_NODES or key in self._latest:
                    self._latest[key] = (time.monotonic(), msg)

    def open(self) -> None:
        self._session.open()

    def ask(self) -> None:
        self._session.send(self._hello())

    def close(self) -> None:
        self._session.close()

    def status(self, since: float = -math.inf) -> dict[str, Any]:
        """Who answered since ``since`` (monotonic), as :func:`summarize` groups it."""
        with self._lock:
            self._latest = {k: v for k, v in self._latest.items() if v[0] >= since}
            hellos = [msg for _, msg in self._latest.values()]
        return {"cluster": self.who.cluster, "board": str(self.who.board), **summarize(hellos)}


def collect(who: Participant, wait: float, **session_options: Any) -> dict[str, Any]:
    """Join the board as an observer for ``wait`` seconds and summarize who answered."""
    observer = Observer(who, **session_options)
    observer.open()
    try:
        threading.Event().wait(wait)  # the collection window: answers have no end marker
    finally:
        observer.close()
    return observer.status()


def watch(who: Participant, every: float = 1.0, duration: float | None = None,
          **session_options: Any) -> Iterator[dict[str, Any]]:
    """A status every ``every`` seconds, for ``duration`` seconds or until the caller stops iterating.

    A node that has not answered the last :data:`FORGET_AFTER_ROUNDS` asks
    (it left, or lost the board) drops out of the view.
    """
    observer = Observer(who, **session_options)
    observer.open()
    tick = threading.Event()
    end = math.inf if duration is None else time.monotonic() + duration
    try:
        while True:
            now = time.monotonic()
            if now >= end:
                return
            tick.wait(min(every, end - now))
            yield observer.status(since=time.monotonic() - FORGET_AFTER_ROUNDS * max(every, ANSWER_AT_MOST_EVERY))
            observer.ask()
    finally:
        observer.close()


def format_status(status: dict[str, Any]) -> str:
    workers, clients = status["workers"], status["clients"]
    lines = [f"cluster {status['cluster']} on {status['board']}: "
             f"{len(workers)} worker(s), {len(clients)} client(s)"]
    if workers:
        lines.append("workers:")
        for w in workers:
            lent = _lent(w)
            lines.append(f"  {_worker(w):<24} {_busy(w)}  {_resources(w, lent)}  python {_text(w.get('py')):<5} "
                         f"{_platform(w, lent):<14} loadavg {_text(w.get('load')):<5} "
                         f"reachable: {REACH.get(str(w.get('reach')), _text(w.get('reach')))}")
            lines.extend(f"    lease for {_text(lease.get('client'))}: {_text(lease.get('path'))}"
                         for lease in _leases(w))
            lines.extend(_release(w))
    if clients:
        lines.append("clients:")
        for c in clients:
            lines.append(f"  {_text(c['user']):<16} queued {_text(c.get('queued')):<6} "
                         f"running {_text(c.get('running')):<4} done {_text(c.get('done')):<6} "
                         f"failed {_text(c.get('failed')):<4} python {_text(c.get('py'))}")
            lines.extend(f"    lease of {_text(lease.get('worker'))} ({_text(lease.get('slots'))} slots): "
                         f"{_text(lease.get('path'))}" for lease in _leases(c))
            lines.extend(_release(c))
            banned = c.get("banned") if isinstance(c.get("banned"), dict) else {}
            lines.extend(f"    banned {_text(member)}: {_text(why)}" for member, why in banned.items())
    if not workers and not clients:
        lines.append("nobody answered; workers join with: p2pexec-worker --cluster " + status["cluster"])
    return "\n".join(lines)


def _text(value: Any) -> str:
    """A field a peer sent, safe to print: no control characters (a member could send escape codes)."""
    if value is None:
        return "?"
    return "".join(ch if ch.isprintable() else "?" for ch in str(value))[:200]


def _worker(worker: dict[str, Any]) -> str:
    """``member/machine``: a member's machines told apart (just the member, from a worker that names none)."""
    machine = messages.machine_name(worker.get("name"))
    return f"{_text(worker['user'])}/{machine}" if machine else _text(worker["user"])


def _release(node: dict[str, Any]) -> list[str]:
    """A line under a node of another p2pexec release than ours: it and we cannot lease with each other."""
    revision = revision_in(node)
    if revision == REVISION:
        return []
    return [f"    another p2pexec release: wire revision {_text(revision)}, this one's {REVISION} "
            "(they cannot work together: upgrade whichever is older)"]


def _busy(worker: dict[str, Any]) -> str:
    slots, free = worker.get("slots"), worker.get("free")
    if isinstance(slots, int) and isinstance(free, int):
        return f"{slots - free}/{slots} slots busy"
    return f"?/{_text(slots)} slots busy"


def _lent(worker: dict[str, Any]) -> Resources | None:
    """What the worker advertises it lends, if it does (and says it well)."""
    try:
        return Resources.from_json(worker.get("res"))
    except (ValueError, TypeError):
        return None


def _platform(worker: dict[str, Any], lent: Resources | None) -> str:
    """OS and CPU architecture (``linux/x86_64``); just the OS from a worker that does not advertise more."""
    if lent is not None and lent.os and lent.arch:
        return _text(f"{lent.os}/{lent.arch}")
    return _text(worker.get("platform"))


def _resources(worker: dict[str, Any], lent: Resources | None) -> str:
    """Cores and memory; with a worker that advertises them, the memory it lends (in all and per slot), its
    GPUs and tags."""
    cores, memory = worker.get("cores"), worker.get("memory")
    cpu = f"{cores} cores" if isinstance(cores, int) else "? cores"
    if lent is not None:
        gpus = f", {len(lent.gpus)} GPU(s): {_text(', '.join(str(g) for g in lent.gpus[:4]))}" if lent.gpus else ""
        tags = f", tags {_text(','.join(sorted(lent.tags)))}" if lent.tags else ""
        return f"{cpu}, {format_size(lent.memory)} lent ({format_size(lent.share)} per slot){gpus}{tags}"
    mem = f"{memory / (1 << 30):.1f} GiB" if isinstance(memory, (int, float)) and memory > 0 else "? GiB"
    return f"{cpu}, {mem}"


REACH = {
    "public": "directly, at the addresses it listens on",
    "nat": "behind a NAT: through the relay, then hole-punched where the routers allow",
    "relay-only": "behind a NAT that defeats hole punching: through the relay only",
    "unreachable": "NO: behind a NAT and no relay took it",
    "unknown": "not checked (no relay known)",
}


def _leases(node: dict[str, Any]) -> list[dict[str, Any]]:
    leases = node.get("leases")
    return [lease for lease in leases if isinstance(lease, dict)] if isinstance(leases, list) else []
