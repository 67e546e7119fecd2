"""Where a request's time goes on the board benchmark (``bench_board_scale.py --trace``).

Every participant notes, by the shared wall clock, what it did with each request and offer; the board
notes when each line reached it, when the hub routed it and, for a request, which workers it chose and
whether the board had them as free or busy.  :func:`breakdown` puts the pieces of each round's first
offer together::

    client signs a request ─► board reads it ─► board routes it ─► worker reads it ─► worker offers
        ─► board reads the offer ─► client reads it

Only for measuring: it wraps the board's methods in the benchmark's board process.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter, defaultdict
from typing import Any


def install_board(board: Any) -> list[tuple[Any, ...]]:
    """Wrap ``board``'s relay to note each request and offer; returns the list the notes go to."""
    notes: list[tuple[Any, ...]] = []
    local = threading.local()
    dispatcher, hub = board._dispatcher, board.hub
    relay_line, hub_relay = dispatcher._relay, hub.relay

    def relay(session: Any, line: bytes) -> bool:
        local.read = time.time()
        return relay_line(session, line)  # type: ignore[no-any-return]

    def routed(session_id: int, checked: Any, now: float) -> Any:
        locked = time.time()
        result = hub_relay(session_id, checked, now)
        msg = checked.route.message
        if msg is None or msg.type not in ("request", "offer", "hello", "withdraw"):
            return result
        sessions = hub._topics.sessions
        if msg.type == "hello":
            notes.append(("hello", msg.sender, msg.body.get("free"), getattr(local, "read", locked)))
            return result
        to: list[tuple[str, str]] = []
        free = busy = 0
        if msg.type == "withdraw":
            to = [(sessions[sid].user, "") for sid in result.to if sid in sessions]
        if msg.type == "request" and session_id in sessions:
            topic = hub._topics.get(sessions[session_id].topic)
            fo = topic.fanout
            free, busy = len(fo.free), len(fo.busy)
            to = [(sessions[sid].user, "free" if sid in fo.free else "held" if sid in getattr(fo, "held", ())
                   else "busy" if sid in fo.busy else "?")
                  for sid in result.to if sid in sessions]
        notes.append((msg.type, msg.sender, msg.body.get("req"), msg.ts, getattr(local, "read", locked), locked,
                      time.time(), to, free, busy))
        return result

    dispatcher._relay = relay
    hub.relay = routed
    return notes


def _q(xs: list[float], scale: float = 1000, unit: str = " ms") -> str:
    if not xs:
        return "-"
    xs = sorted(xs)
    return (f"p50 {scale * statistics.median(xs):.0f} p95 {scale * xs[int(0.95 * (len(xs) - 1))]:.0f}{unit} "
            f"(n={len(xs)})")


def breakdown(board: list[tuple[Any, ...]], workers: list[tuple[Any, ...]], clients: list[tuple[Any, ...]],
              t0: float, t1: float) -> list[str]:
    """Lines of text: where each round's first offer's time went, for rounds begun in [t0, t1)."""
    out: list[str] = []
    sent: dict[str, list[float]] = defaultdict(list)  # req -> times the client sent it
    first_offer: dict[str, tuple[float, float, str]] = {}  # req -> (client read, offer ts, worker)
    for note in clients:
        if note[0] == "sent":
            sent[note[1]].append(note[2])
        elif note[0] == "offer" and note[1] not in first_offer:
            first_offer[note[1]] = (note[2], note[3], note[4])
    got: dict[tuple[str, str], tuple[float, str, bool]] = {}  # (req, worker) -> first read, state, offered at once
    offered: dict[tuple[str, str], float] = {}  # (req, worker) -> offer sent
    states: Counter[str] = Counter()
    holds: dict[str, list[float]] = defaultdict(list)
    for note in workers:
        if note[0] == "request":
            _, worker, req, read, state, now = note
            got.setdefault((req, worker), (read, state, now))
            states[state] += 1
        elif note[0] == "offer":
            offered.setdefault((note[2], note[1]), note[3])
        elif note[0] == "release":
            holds[note[2]].append(note[3])
    b_req: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    b_offer: dict[tuple[str, str], tuple[Any, ...]] = {}
    view: Counter[tuple[str, str]] = Counter()  # (board's view, worker's state) for each request delivered
    hellos = 0
    for note in board:
        if note[0] == "hello":
            hellos += t0 <= note[3] < t1
            continue
        kind, sender, req = note[:3]
        if kind == "withdraw":
            continue
        if kind == "request":
            b_req[req].append(note)
            for worker, seen in note[7]:
                w = got.get((req, worker))
                view[seen, w[1] if w else "lost"] += 1
        else:
            b_offer.setdefault((req, sender), note)
    parts: dict[str, list[float]] = defaultdict(list)
    which: Counter[str] = Counter()
    for req, times in sent.items():
        start = min(times)
        if not t0 <= start < t1:
            continue
        if req not in first_offer:
            which["no offer"] += 1
            continue
        read, ots, worker = first_offer[req]
        parts["total: first request -> offer read"].append(read - start)
        w = got.get((req, worker))
        if w is None:
            which["worker's read not noted"] += 1
            continue
        wread, state, now = w
        route = next((n for n in b_req[req] if any(x == worker for x, _ in n[7])), None)
        if route is None:
            which["not routed to it?"] += 1
            continue
        k = sum(1 for t in times if t <= route[3] + 0.0005)  # which of the round's requests reached the worker
        which[f"request #{k}, worker {state}{' (offered at once)' if now else ' (waited)'}"] += 1
        parts["wait for the request that got it (re-requests)"].append(route[3] - start)
        parts["client sign -> board read"].append(route[4] - route[3])
        parts["board read -> hub lock (signature, lock)"].append(route[5] - route[4])
        parts["hub routed -> worker read"].append(wread - route[6])
        parts["worker read -> offer signed"].append(ots - wread)
        bo = b_offer.get((req, worker))
        if bo is not None:
            parts["offer signed -> board read"].append(bo[4] - ots)
            parts["board read offer -> client read"].append(read - bo[4])
    out.append("  rounds' first offers: " + ", ".join(f"{k}: {v}" for k, v in which.most_common()))
    for k, v in parts.items():
        out.append(f"    {k}: {_q(v)}")
    out.append("  workers' state when a request reached them: " + ", ".join(f"{k} {v}" for k, v in states.most_common()))
    out.append("  board's view -> worker's state: " + ", ".join(f"{a}->{b} {v}" for (a, b), v in view.most_common()))
    out.append("  offers' holds, until: " + ", ".join(f"{k} {_q(v)}" for k, v in holds.items()))
    free = [n[8] for r in b_req.values() for n in r if t0 <= n[3] < t1]
    out.append(f"  workers in the board's free line at each request: {_q(free, 1, '')}, "
               f"hellos relayed: {hellos}")
    return out
