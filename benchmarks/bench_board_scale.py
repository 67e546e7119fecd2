"""A board for thousands: one board, 50 simulated clients and 32 ... 1,000 simulated workers.

    python benchmarks/bench_board_scale.py [--workers 32,100,300,1000] [--clients 50] [--seconds 15]
                                           [--trace] [--json results.json]

Everyone is a real SSH session on a real ``BoardServer`` (its own process)
through the real board client, with real signed lines that every receiver
checks; no libp2p.  A simulated worker (1 slot) answers a request with an offer
as ``p2pexec-worker`` does (holding its slot for a few seconds; a request that
finds it busy waits for its slot until the request expires), says hello on
joining, every 30 s, and when it looks again (a request or a withdraw came,
its lease ended, an offer's hold is over) and finds its slot leased or free
unlike its last hello said, at most once a second; as for the worker, an
offer's hold does not make its slot busy in a hello.  A simulated client repeatedly wants two leases of ``--tasks-per-lease``
short tasks (then pauses, ``--think`` seconds on average, and as long before
its first round): it posts a request (again every 2 s while it wants), accepts
the first offers with an ``accept`` line addressed to the worker (where a real
client opens a libp2p stream), withdraws once it has its leases, and the
worker is busy for the lease's tasks.  For each worker count, the same sessions
run once with the board's fan-out (requests to a bounded set of workers) and
once with it off (broadcast, as before), and the script reports lines
delivered per task, offers per request, the board process's CPU seconds per
task, the time from a round's first request to its first offer (at the client)
and to its first lease (the worker has the client's accept: where a real
client opens its libp2p stream), and the board's threads.  With ``--trace``, it
also prints where each round's first offer's time went, hop by hop, and what
state the workers a request reached were in (``_board_trace.py``).

The simulated participants share processes (125 workers, or 25 clients, to a
process), each with its own SSH connection; their paramiko threads check for
a closed connection every 5 s rather than paramiko's 0.1 s (as the board's
do), or 1,000 of them would spend the CPU the board is measured on.  Every
wait is bounded: a stuck board or participant fails the run within minutes,
and every process started is ended on the way out.
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _board_trace import breakdown, install_board
from _common import verdict, write_json

from p2pexec.board.address import BoardAddress
from p2pexec.board.client import BoardSession
from p2pexec.board.fanout import MIN_FANOUT
from p2pexec.keys import Keyring, generate_identity_file, load_identity
from p2pexec.protocol import messages
from p2pexec.protocol.matching import REVISION

CLUSTER = "owner/scale"
TASK_SECONDS = 0.005
REQUEST_EVERY = 2.0
REQUEST_TTL = 10.0
OFFER_TTL = 15.0
OFFER_HOLD = 3.0
HELLO_EVERY = 30.0
HELLO_NEWS_EVERY = 1.0
LEASES_WANTED = 2
PER_PROCESS = 125  # simulated workers per process
SIM_POLL = 5.0  # seconds between a simulated participant's paramiko thread's idle checks
JOIN_WITHIN = 600.0  # seconds for everyone to join
ANSWER_WITHIN = 120.0  # seconds for the board, or a phase's results, to answer past their due
KX = messages.b64(b"\0" * 32)


def names(kind: str, count: int) -> list[str]:
    return [f"{kind}{i}" for i in range(count)]


# -- the board ------------------------------------------------------------------------------

def run_board(tmp: str, conn: Any, trace: bool) -> None:
    import paramiko

    from p2pexec.board.admission import Limits
    from p2pexec.board.server import BoardServer, dedicate_process

    dedicate_process()  # (as `p2pexec board` does)
    users = Keyring.parse((Path(tmp) / "users.txt").read_text())
    board = BoardServer(host_key=paramiko.Ed25519Key.from_private_key_file(str(Path(tmp) / "keys" / "owner")),
                        users=users, state_dir=Path(tmp) / "state", subscriber_queue=100_000,
                        lines_per_second=1000.0,
                        limits=Limits(max_connections=4000, connections_per_source=4000, unauthenticated_per_source=256,
                                      handshakes_per_source=64, handshake_timeout=60, auth_timeout=120))
    notes = install_board(board) if trace else []
    board.start()
    board.set_members(CLUSTER, [line.split()[0] for line in (Path(tmp) / "users.txt").read_text().splitlines()])
    conn.send(board.port)
    while True:
        cmd: tuple[Any, ...] = conn.recv() if conn.poll(JOIN_WITHIN + 3 * ANSWER_WITHIN) else ("stop",)  # the bench died
        if cmd[0] == "fan_out":
            with board._cond:
                board.hub.fan_out = cmd[1]
            conn.send(None)
        elif cmd[0] == "trace":
            with board._cond:
                conn.send(list(notes))
        elif cmd[0] == "stats":
            with board._cond:
                conn.send({"cpu": time.process_time(), "relayed": board.hub.relayed,
                           "delivered": board.hub.delivered, "dropped": dict(board.hub.dropped),
                           "refused": dict(board.hub.refused), "threads": threading.active_count()})
        else:
            board.stop()
            conn.send(None)
            return


# -- simulated participants -----------------------------------------------------------------

class Participant:
    def __init__(self, tmp: str, name: str, port: int, keyring: Keyring, trace: bool) -> None:
        self.notes: list[tuple[Any, ...]] | None = [] if trace else None  # see _board_trace.py
        self.identity = load_identity(name, Path(tmp) / "keys" / name)
        self.name = name
        self.lock = threading.Lock()
        self.session = BoardSession(
            BoardAddress("127.0.0.1", port), self.identity, CLUSTER,
            inbox=messages.Inbox(CLUSTER, keyring, me=name), on_message=self.on_message, make_hello=self.hello,
            known_hosts=Path(tmp) / f"known_hosts.{os.getpid()}", accept_new_host_key=True, timeout=60)

    def sign(self, mtype: str, body: dict[str, Any], ttl: float) -> bytes:
        return messages.encode(self.identity, CLUSTER, mtype, body, now=time.time(), ttl=ttl)

    def hello(self) -> bytes:
        raise NotImplementedError

    def on_message(self, msg: messages.Message) -> None:
        raise NotImplementedError


class Worker(Participant):
    """One slot; offers it to a request when free and not held by an offer not yet taken.

    Like ``p2pexec-worker`` (``worker/decisions.py``): its hellos count the slot free unless a lease has
    it (an offer's hold does not count), and it looks again (the news hello, then offers) when a request
    or a withdraw comes, when its lease ends and when an offer's hold is over."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.busy_until = 0.0
        self.leased = False  # a lease has the slot (until busy_until), as far as it looked
        self.held: tuple[str, str, float] | None = None  # offer id, request id, until
        self.said_free = (True, -1e9)
        self.requests = 0
        self.waiting: dict[tuple[str, str], float] = {}  # (client, request id) -> until: offered to when free
        self.leases: list[tuple[float, float]] = []  # (when, seconds since the round's first request)

    def free(self, now: float) -> bool:
        return now >= self.busy_until and (self.held is None or self.held[2] <= now)

    def offer(self, now: float) -> None:
        """Offer the slot to the request waiting longest, if it is free (as the worker's fair sharing does)."""
        self.waiting = {k: until for k, until in self.waiting.items() if until > now}
        if not self.waiting or not self.free(now):
            return
        client, req = next(iter(self.waiting))
        del self.waiting[client, req]
        line = self.sign("offer", {"req": req, "to": client, "slots": 1, "py": "3.11", "rev": REVISION,
                                   "peer": self.name, "addrs": [], "kx": KX}, ttl=OFFER_TTL)
        self.held = (messages.decode(line).id, req, now + OFFER_HOLD)
        self.session.send(line)
        if self.notes is not None:
            self.held_at = time.time()
            self.notes.append(("offer", self.name, req, self.held_at))

    def note_release(self, how: str) -> None:
        if self.notes is not None:
            self.notes.append(("release", self.name, how, time.time() - self.held_at,
                               self.held[1] if self.held else None))

    def look_again(self, now: float) -> None:
        """The worker's ``look_again``: a hello if its slot turned leased or free unlike its last hello said
        (at most once a second), then offers."""
        self.leased = now < self.busy_until
        if now - self.said_free[1] >= HELLO_NEWS_EVERY and (not self.leased) != self.said_free[0]:
            self.session.send(self.hello())
        self.offer(now)

    def tick(self, now: float) -> None:
        with self.lock:
            if (self.leased and now >= self.busy_until) or (self.held is not None and self.held[2] <= now):
                if self.held is not None and self.held[2] <= now:
                    self.note_release("expired")
                    self.held = None
                self.look_again(now)  # its lease ended, or an offer's hold is over

    def hello(self) -> bytes:
        now = time.monotonic()
        free = now >= self.busy_until  # (what its leases hold: an offer's hold is not counted)
        self.said_free = (free, now)
        return self.sign("hello", {"role": "worker", "node": self.name, "py": "3.11", "rev": REVISION, "slots": 1,
                                   "free": int(free)}, ttl=60)

    def on_message(self, msg: messages.Message) -> None:
        now = time.monotonic()
        with self.lock:
            if msg.type == "request":
                self.requests += 1
                state = "busy" if now < self.busy_until else "free" if self.free(now) else "held"
                self.waiting[msg.sender, msg["req"]] = now + (msg.exp - msg.ts)
                self.look_again(now)
                if self.notes is not None:
                    self.notes.append(("request", self.name, msg["req"], time.time(), state,
                                       self.held is not None and self.held[1] == msg["req"]))
            elif msg.type == "withdraw":
                self.waiting.pop((msg.sender, msg["req"]), None)
                if self.held is not None and self.held[1] == msg["req"]:
                    self.note_release("withdrawn")
                    self.held = None
                self.look_again(now)
            elif msg.type == "accept" and msg["worker"] == self.name and self.held is not None \
                    and self.held[0] == msg["offer"]:
                self.note_release("accepted")
                self.held = None
                self.busy_until = now + msg["tasks"] * TASK_SECONDS
                self.leased = True
                if msg.body.get("first") is True:  # the round's first lease starts here
                    wall = time.time()
                    self.leases.append((wall, wall - msg["asked"]))


class Client(Participant):
    """Wants LEASES_WANTED leases of ``tasks`` tasks at a time, round after round, while ``running``."""

    def __init__(self, *args: Any, tasks: int, think: float) -> None:
        super().__init__(*args)
        self.tasks, self.think = tasks, think
        self.next_round = 0.0
        self.req = messages.new_id()
        self.leases: list[float] = []  # when each lease of this round ends
        self.wanted = 0
        self.asked_at = -1e9
        self.round_at: float | None = None  # the round's first request, until its first offer
        self.asked_wall = 0.0  # the round's first request, by the wall clock the workers share
        self.reset()

    def reset(self) -> None:
        self.requests = self.offers = self.done = 0
        self.latencies: list[float] = []

    def hello(self) -> bytes:
        return self.sign("hello", {"role": "client", "node": self.name, "py": "3.11", "rev": REVISION}, ttl=60)

    def request(self, now: float) -> None:
        self.asked_at = now
        self.requests += 1
        if self.notes is not None:
            self.notes.append(("sent", self.req, time.time()))
        self.session.send(self.sign("request", {"req": self.req, "client": self.name, "n": self.wanted,
                                                "py": "3.11", "rev": REVISION}, ttl=REQUEST_TTL))

    def tick(self, now: float, running: bool) -> None:
        with self.lock:
            ended = [end for end in self.leases if end <= now]
            self.done += self.tasks * len(ended)
            self.leases = [end for end in self.leases if end > now]
            if ended and not self.leases and not self.wanted:
                self.next_round = now + random.uniform(0, 2 * self.think)
            if self.wanted == 0 and not self.leases and running and now >= self.next_round:
                self.wanted = LEASES_WANTED
                self.round_at, self.asked_wall = now, time.time()
                self.req = messages.new_id()  # a late offer for the last round is not this round's
                self.request(now)
            elif self.wanted and now - self.asked_at >= REQUEST_EVERY:
                self.request(now)

    def on_message(self, msg: messages.Message) -> None:
        now = time.monotonic()
        with self.lock:
            if msg.type != "offer" or msg["req"] != self.req:
                return
            self.offers += 1
            if self.notes is not None:
                self.notes.append(("offer", msg["req"], time.time(), msg.ts, msg.sender))
            if self.round_at is not None:
                self.latencies.append(now - self.round_at)
                self.round_at = None
            if self.wanted <= 0:
                return
            first = self.wanted == LEASES_WANTED
            self.wanted -= 1
            self.leases.append(now + self.tasks * TASK_SECONDS)
            self.session.send(self.sign("accept", {"offer": msg.id, "worker": msg.sender, "req": self.req, "kx": KX,
                                                   "slots": 1, "to": msg.sender, "tasks": self.tasks,
                                                   "first": first, "asked": self.asked_wall}, ttl=OFFER_TTL))
            if self.wanted == 0:
                self.session.send(self.sign("withdraw", {"req": self.req}, ttl=REQUEST_TTL))


def open_all(people: list[Participant]) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: p.session.open(within=300), people))


def simulated() -> None:
    """Set up a process of simulated participants (see the module's docstring)."""
    import paramiko

    logging.disable(logging.WARNING)  # "added the board's host key", once per session
    paramiko.Transport._active_check_timeout = SIM_POLL


def run_workers(tmp: str, port: int, who: list[str], ready: Any, stop: Any, leases: Any, trace: bool) -> None:
    simulated()
    keyring = Keyring.parse((Path(tmp) / "users.txt").read_text())
    workers = [Worker(tmp, name, port, keyring, trace) for name in who]
    open_all(workers)  # type: ignore[arg-type]
    ready.put(len(workers))
    start = last = time.monotonic()
    while not stop.wait(0.02):
        now = time.monotonic()
        for i, w in enumerate(workers):
            w.tick(now)  # a slot freed: offer it to who waits
            if (now - start - i * HELLO_EVERY / len(workers)) % HELLO_EVERY < now - last:  # every HELLO_EVERY
                w.session.send(w.hello())
        last = now
    leases.put(([x for w in workers for x in w.leases], [x for w in workers for x in w.notes or ()]))
    for w in workers:
        w.session.close()


def run_clients(tmp: str, port: int, who: list[str], tasks: int, think: float, ready: Any, phases: Any,
                results: Any, trace: bool) -> None:
    simulated()
    keyring = Keyring.parse((Path(tmp) / "users.txt").read_text())
    clients = [Client(tmp, name, port, keyring, trace, tasks=tasks, think=think) for name in who]
    open_all(clients)  # type: ignore[arg-type]
    ready.put(len(clients))
    while True:
        phase = phases.get(timeout=JOIN_WITHIN + 3 * ANSWER_WITHIN)
        if phase is None:
            break
        seconds = phase
        for c in clients:
            c.reset()
            # The first rounds spread like the later ones (not all 50 in the same 10 ms: a burst the
            # round latencies of a 15 s phase would be about).
            c.next_round = time.monotonic() + random.uniform(0, 2 * think)
        end = time.monotonic() + seconds
        while True:
            now = time.monotonic()
            if now >= end:
                break
            for c in clients:
                c.tick(now, True)
            time.sleep(0.01)
        results.put({"requests": sum(c.requests for c in clients), "offers": sum(c.offers for c in clients),
                     "done": sum(c.done for c in clients), "latencies": [x for c in clients for x in c.latencies],
                     "notes": [x for c in clients for x in c.notes or ()]})
        for c in clients:
            c.notes = [] if trace else None
        settle = time.monotonic() + 2 * OFFER_HOLD  # let leases end and held offers expire between phases
        while time.monotonic() < settle:
            for c in clients:
                c.tick(time.monotonic(), False)
                with c.lock:
                    if c.wanted:
                        c.wanted = 0
                        c.session.send(c.sign("withdraw", {"req": c.req}, ttl=REQUEST_TTL))
            time.sleep(0.05)
    for c in clients:
        c.session.close()


# -- one worker count -----------------------------------------------------------------------

def report(workers: int, policy: str, p: dict[str, Any]) -> None:
    def ms(x: float | None) -> str:
        return f"{x:.0f}" if x is not None else "-"
    print(f"  {workers} workers, {policy:<9}: {p['tasks']} tasks, {p['lines_delivered_per_task']:.2f} lines "
          f"delivered/task ({p['lines_relayed_per_task']:.3f} relayed), {p['offers_per_request']:.1f} offers/request, "
          f"board CPU {p['board_cpu_ms_per_task']:.2f} ms/task ({p['board_threads']} threads); request->first offer "
          f"p50 {ms(p['first_offer_ms_median'])} ms, p95 {ms(p['first_offer_ms_p95'])}, max "
          f"{ms(p['first_offer_ms_max'])}; ->first lease p50 {ms(p['first_lease_ms_median'])} ms, p95 "
          f"{ms(p['first_lease_ms_p95'])}" + (f", dropped {p['dropped']}" if p["dropped"] else "")
          + (f", refused {p['refused']}" if p["refused"] else ""), flush=True)


def quantiles(xs: list[float]) -> tuple[float | None, float | None, float | None]:
    """Median, 95th percentile and maximum, in ms."""
    if not xs:
        return None, None, None
    xs = sorted(xs)
    return 1000 * statistics.median(xs), 1000 * xs[int(0.95 * (len(xs) - 1))], 1000 * xs[-1]


def growth(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The counters that grew between two of the board's stats."""
    return {k: v - a.get(k, 0) for k, v in b.items() if v - a.get(k, 0)}


def measure(tmp: str, workers: int, clients: int, seconds: float, tasks: int, think: float,
            broadcast: bool, trace: bool = False) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    board = ctx.Process(target=run_board, args=(tmp, there, trace), daemon=True)
    ready, stop, results, leases = ctx.Queue(), ctx.Event(), ctx.Queue(), ctx.Queue()
    procs: list[Any] = []
    client_phases: list[Any] = []

    def ask(*cmd: Any) -> Any:
        here.send(cmd)
        if not here.poll(ANSWER_WITHIN):
            raise TimeoutError(f"the board did not answer {cmd[0]!r} within {ANSWER_WITHIN:g} s")
        return here.recv()

    board.start()
    try:
        if not here.poll(ANSWER_WITHIN):
            raise TimeoutError("the board did not start")
        port = here.recv()
        started = time.monotonic()
        wnames = names("w", workers)
        for i in range(0, workers, PER_PROCESS):
            procs.append(ctx.Process(target=run_workers, args=(tmp, port, wnames[i:i + PER_PROCESS], ready, stop,
                                                               leases, trace), daemon=True))
        n_workers = len(procs)
        cnames = names("c", clients)
        for i in range(0, clients, 25):
            q = ctx.Queue()
            client_phases.append(q)
            procs.append(ctx.Process(target=run_clients, args=(tmp, port, cnames[i:i + 25], tasks, think, ready, q,
                                                               results, trace), daemon=True))
        for p in procs:
            p.start()
        joined = sum(ready.get(timeout=max(1.0, started + JOIN_WITHIN - time.monotonic())) for _ in procs)
        assert joined == workers + clients
        out: dict[str, Any] = {"workers": workers, "clients": clients, "join_s": time.monotonic() - started}
        time.sleep(2.0)  # the hellos of the last to join
        print(f"{workers} workers and {clients} clients joined in {out['join_s']:.0f} s", flush=True)
        windows = {}
        client_notes: list[Any] = []
        for policy, fan_out in (("fan-out", True), ("broadcast", False))[:2 if broadcast else 1]:
            ask("fan_out", fan_out)
            before = ask("stats")
            windows[policy] = [time.time(), 0.0]
            for q in client_phases:
                q.put(seconds)
            parts = [results.get(timeout=seconds + ANSWER_WITHIN) for _ in client_phases]
            windows[policy][1] = time.time()
            client_notes += [x for p in parts for x in p["notes"]]
            after = ask("stats")
            done = sum(p["done"] for p in parts)
            requests = sum(p["requests"] for p in parts)
            first_offer = quantiles([x for p in parts for x in p["latencies"]])
            out[policy] = {
                "tasks": done, "requests": requests, "offers": sum(p["offers"] for p in parts),
                "offers_per_request": sum(p["offers"] for p in parts) / max(1, requests),
                "lines_relayed_per_task": (after["relayed"] - before["relayed"]) / max(1, done),
                "lines_delivered_per_task": (after["delivered"] - before["delivered"]) / max(1, done),
                "board_cpu_s": after["cpu"] - before["cpu"],
                "board_cpu_ms_per_task": 1000 * (after["cpu"] - before["cpu"]) / max(1, done),
                "board_threads": after["threads"],
                "first_offer_ms_median": first_offer[0], "first_offer_ms_p95": first_offer[1],
                "first_offer_ms_max": first_offer[2],
                "dropped": growth(before["dropped"], after["dropped"]),
                "refused": growth(before["refused"], after["refused"]),
            }
        board_notes = ask("trace") if trace else []
        for q in client_phases:
            q.put(None)
        stop.set()
        got, worker_notes = [], []
        for _ in range(n_workers):
            mine, notes = leases.get(timeout=ANSWER_WITHIN)
            got += mine
            worker_notes += notes
        for policy, (t0, t1) in windows.items():
            lease = quantiles([dt for when, dt in got if t0 <= when - dt < t1])
            out[policy].update(first_lease_ms_median=lease[0], first_lease_ms_p95=lease[1], first_lease_ms_max=lease[2])
            report(workers, policy, out[policy])
            if trace:
                print("\n".join(breakdown(board_notes, worker_notes, client_notes, t0, t1)), flush=True)
                if os.environ.get("BENCH_TRACE_DUMP"):
                    import pickle
                    with open(os.environ["BENCH_TRACE_DUMP"], "wb") as f:
                        pickle.dump((board_notes, worker_notes, client_notes, windows), f)
        return out
    finally:
        stop.set()
        for q in client_phases:
            q.put(None)
        deadline = time.monotonic() + 60
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        try:
            ask("stop")
        except (TimeoutError, OSError):
            pass
        board.join(30)
        for p in (*procs, board):
            if p.is_alive():
                p.kill()
                p.join(10)


def setup(tmp: Path, workers: int, clients: int) -> None:
    keys = tmp / "keys"
    keys.mkdir(exist_ok=True)
    everyone = ["owner", *names("w", workers), *names("c", clients)]
    lines = []
    for name in everyone:
        if not (keys / name).exists():
            generate_identity_file(keys / name, comment=name)
        lines.append(f"{name} {(keys / f'{name}.pub').read_text().strip()}\n")
    (tmp / "users.txt").write_text("".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="32,100,300,1000")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--tasks-per-lease", type=int, default=20)
    parser.add_argument("--think", type=float, default=1.0,
                        help="mean seconds a client waits between rounds (0: it always wants slots)")
    parser.add_argument("--broadcast-up-to", type=int, default=300,
                        help="measure the broadcast baseline up to this many workers (past it, it takes too long)")
    parser.add_argument("--trace", action="store_true",
                        help="note where each request's time goes, and print it (see _board_trace.py)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    counts = [int(x) for x in args.workers.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-board-scale-") as tmp:
        setup(Path(tmp), max(counts), args.clients)
        for workers in counts:
            r = measure(tmp, workers, args.clients, args.seconds, args.tasks_per_lease, args.think,
                        workers <= args.broadcast_up_to, args.trace)
            results.append(r)
            write_json(args.json, {"results": results})
    if len(results) > 1:
        first = results[0]
        linear = True
        for policy in ("fan-out", "broadcast"):
            last = [r for r in results if policy in r][-1]
            more = last["workers"] / first["workers"]
            a, b = first[policy], last[policy]
            parts = []
            for what, key in (("lines/task", "lines_delivered_per_task"), ("board CPU/task", "board_cpu_ms_per_task")):
                ratio = b[key] / max(1e-9, a[key])
                parts.append(f"{what} x{ratio:.1f} (exponent {math.log(max(ratio, 1e-9)) / math.log(more):.2f})")
                linear &= policy != "fan-out" or ratio <= more
            print(f"{policy}: {first['workers']} -> {last['workers']} workers (x{more:.0f}): {', '.join(parts)}")
        last = results[-1]
        fo = last["fan-out"]
        ok = ((fo["first_offer_ms_p95"] or 1e9) <= 1000 and (fo["first_lease_ms_p95"] or 1e9) <= 1000
              and fo["offers_per_request"] <= max(MIN_FANOUT, 2 * LEASES_WANTED) and linear)
        print(f"target (with {last['workers']} workers: bounded offers per request, request->first offer and ->first "
              f"lease <= 1 s at p95; per-task lines and board CPU growing no faster than the workers): "
              f"{verdict(ok)}")
    write_json(args.json, {"results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
