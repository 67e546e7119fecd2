"""Load: 64 members' clients and 32 workers on one board, while strangers flood it.

Two strangers hold 300 idle sockets each, re-opened as they are closed: one
against the board's SSH port (from 127.0.0.2), one against a worker's libp2p
port (from 127.0.0.3).  Meanwhile 64 members, each with a key of their own,
map a few tasks each; every one must get every result.  The members' clients
run in 16 processes of 4 and each flood in a process of its own, as they
would on their own machines (in the board's process they would starve it of
the GIL, which a real board does not share).  All of them connect from
127.0.0.1, one source for the board's per-source limits.  Everything is
bounded in time.  Used by tests/test_load.py and benchmarks/load_under_flood.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from p2pexec import LocalCluster

from .flood import libp2p_port

CLIENTS, PROCESSES, WORKERS, TASKS = 64, 16, 32, 8

CLIENT_PROCESS = '''
import json, sys, threading
from p2pexec import P2PExecutor
members, cluster, common, tasks, timeout = json.loads(sys.argv[1])
arriving = threading.Semaphore(1)  # members arrive a few at a time, as people do (16 at once in all)
results, errors = {}, []

def client(i, member):
    try:
        with arriving:
            ex = P2PExecutor(cluster, **common, **member)
        with ex:
            results[i] = list(ex.map(abs, [-(i * tasks + k) for k in range(tasks)], timeout=timeout))
    except BaseException as exc:
        errors.append(f"{member['board']}: {exc!r}")

threads = [threading.Thread(target=client, args=(int(i), m)) for i, m in members.items()]
for t in threads:
    t.start()
for t in threads:
    t.join(timeout + 30)
print(json.dumps({"results": results, "errors": errors, "alive": sum(t.is_alive() for t in threads)}))
'''


FLOOD_PROCESS = '''
import json, sys
from tests.flood import Flood
with Flood(int(sys.argv[1]), sys.argv[2], size=300, max_opened=5000) as flood:
    print("flooding", flush=True)
    sys.stdin.readline()  # until the test is done
print(json.dumps({"opened": flood.opened}), flush=True)
'''


ROOT = str(Path(__file__).resolve().parents[1])


def flood(port: int, source: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH")))))
    proc = subprocess.Popen([sys.executable, "-c", FLOOD_PROCESS, str(port), source], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline() == "flooding\n"
    return proc


class Meter:
    """This process's CPU time and resident memory over a stretch (the board runs in it)."""

    def __init__(self) -> None:
        self._me = psutil.Process()
        self._stop = threading.Event()
        self.peak = self.start_rss = self._me.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _cpu(self) -> float:
        times = self._me.cpu_times()
        return times.user + times.system

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            self.peak = max(self.peak, self._me.memory_info().rss)

    def __enter__(self) -> "Meter":
        self._cpu0, self._t0 = self._cpu(), time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.cpu, self.seconds = self._cpu() - self._cpu0, time.monotonic() - self._t0


def _report(proc: subprocess.Popen[str], deadline: float) -> dict:
    """What a client process printed; if it overran the deadline, that it did (the test then fails saying so)."""
    try:
        return json.loads(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"results": {}, "errors": [f"client process {proc.pid} still running at the deadline"], "alive": 1}


def run(clients: int = CLIENTS, workers: int = WORKERS, tasks: int = TASKS, processes: int = PROCESSES,
        timeout: float = 420.0, floods: bool = True) -> dict:
    """Start the cluster, the floods and the clients; what each client got, and what the board used."""
    with LocalCluster(workers=0) as lc:
        members = {i: lc.add_member(f"m{i:02d}") for i in range(clients)}
        lc.add_workers(workers)
        board = lc.board_server()
        assert board is not None
        common = {"members": lc.members, "known_hosts": lc.known_hosts}
        share = -(-clients // processes)
        with Meter() as meter:
            attackers = [flood(board.port, "127.0.0.2"), flood(libp2p_port(lc.workers[0].log_path), "127.0.0.3")
                         ] if floods else []
            try:
                procs = [subprocess.Popen(
                    [sys.executable, "-c", CLIENT_PROCESS,
                     json.dumps([{i: members[i] for i in range(p * share, min(clients, (p + 1) * share))},
                                 lc.cluster, common, tasks, timeout])],
                    stdout=subprocess.PIPE, text=True) for p in range(processes)]
                deadline = time.monotonic() + timeout + 60
                reports = [_report(proc, deadline) for proc in procs]
            finally:
                opened = [json.loads(proc.communicate("done\n", timeout=60)[0])["opened"] for proc in attackers]
        results = {int(i): values for r in reports for i, values in r["results"].items()}
        right = sum(results.get(i) == [i * tasks + k for k in range(tasks)] for i in range(clients))
        return {"clients": clients, "workers": workers, "all results right": right,
                "errors": [e for r in reports for e in r["errors"]], "still running": sum(r["alive"] for r in reports),
                "flood sockets opened (board, worker)": opened, "seconds": round(meter.seconds, 1),
                "board process CPU (share of one core)": round(meter.cpu / meter.seconds, 3),
                "board process memory growth (MiB, peak)": round((meter.peak - meter.start_rss) / 2**20, 1),
                "board refused": dict(board.refused), "board dropped": dict(board.dropped)}
