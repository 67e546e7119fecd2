"""``p2pexec status``: who is on a cluster's board right now.

The board has no history, so the status command joins with an ``observer``
hello; workers and clients answer with their own hello, which carries their
load (slots, Python, queued and running tasks).  Whatever arrives within the
collection window is the answer.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from .board.client import BoardSession
from .config import Participant
from .protocol import messages

OBSERVER_HELLO_TTL = 30.0
ANSWER_AT_MOST_EVERY = 0.5


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


def collect(who: Participant, wait: float, **session_options: Any) -> dict[str, Any]:
    """Join the board as an observer for ``wait`` seconds and summarize who answered."""
    hellos: list[messages.Message] = []
    lock = threading.Lock()

    def on_message(msg: messages.Message) -> None:
        if msg.type == "hello":
            with lock:
                hellos.append(msg)

    def observer_hello() -> bytes:
        return messages.encode(who.identity, who.cluster, "hello", {"role": "observer"},
                               now=time.time(), ttl=OBSERVER_HELLO_TTL)

    session = BoardSession(who.board, who.identity, who.cluster, inbox=messages.Inbox(who.cluster, who.keyring),
                           on_message=on_message, make_hello=observer_hello, **session_options)
    session.open()
    try:
        threading.Event().wait(wait)  # the collection window: answers have no end marker
    finally:
        session.close()
    with lock:
        summary = summarize(hellos)
    return {"cluster": who.cluster, "board": str(who.board), **summary}


def format_status(status: dict[str, Any]) -> str:
    workers, clients = status["workers"], status["clients"]
    lines = [f"cluster {status['cluster']} on {status['board']}: "
             f"{len(workers)} worker(s), {len(clients)} client(s)"]
    if workers:
        lines.append("workers:")
        for w in workers:
            lines.append(f"  {w['user']:<16} {w.get('free', '?')}/{w.get('slots', '?')} slots free  "
                         f"python {w.get('py', '?'):<5} {w.get('platform', '?'):<8} load {w.get('load', '?'):<5} "
                         f"reachable: {REACH.get(str(w.get('reach')), w.get('reach', '?'))}")
            lines.extend(f"    lease for {lease.get('client', '?')}: {lease.get('path', '?')}"
                         for lease in _leases(w))
    if clients:
        lines.append("clients:")
        for c in clients:
            lines.append(f"  {c['user']:<16} queued {c.get('queued', '?'):<6} running {c.get('running', '?'):<4} "
                         f"python {c.get('py', '?')}")
            lines.extend(f"    lease of {lease.get('worker', '?')} ({lease.get('slots', '?')} slots): "
                         f"{lease.get('path', '?')}" for lease in _leases(c))
            banned = c.get("banned") if isinstance(c.get("banned"), dict) else {}
            lines.extend(f"    banned {member}: {why}" for member, why in banned.items())
    if not workers and not clients:
        lines.append("nobody answered; workers join with: p2pexec-worker --cluster " + status["cluster"])
    return "\n".join(lines)


REACH = {
    "public": "directly (public address)",
    "nat": "behind a NAT: through the relay, then hole-punched where the routers allow",
    "relay-only": "behind a NAT that defeats hole punching: through the relay only",
    "unreachable": "NO: behind a NAT and no relay took it",
    "unknown": "not checked (no relay known)",
}


def _leases(node: dict[str, Any]) -> list[dict[str, Any]]:
    leases = node.get("leases")
    return [lease for lease in leases if isinstance(lease, dict)] if isinstance(leases, list) else []


class AnswerObservers:
    """Rate-limits answers to observer hellos, so a status loop cannot make peers flood."""

    def __init__(self) -> None:
        self._last = -1e9

    def due(self, msg: messages.Message) -> bool:
        if msg.type != "hello" or msg.body.get("role") != "observer":
            return False
        now = time.monotonic()
        if now - self._last < ANSWER_AT_MOST_EVERY:
            return False
        self._last = now
        return True
