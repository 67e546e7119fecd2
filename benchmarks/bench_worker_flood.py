"""A stranger's TCP flood on a worker's libp2p port: a member's latency, the worker's CPU and memory.

    python benchmarks/bench_worker_flood.py [--size 300] [--seconds 40] [--json results.json]

Two attackers (127.0.0.2, 127.0.0.3) each hold ``--size`` idle sockets to
the worker's libp2p port and re-open every one the worker closes.  Meanwhile
a member's client, from 127.0.0.1, opens a new executor (a new connection)
and runs ``pow(2, 3)`` again and again for ``--seconds``.  The same run
measures the worker as it was before issue 15 (py-libp2p's defaults, no
gate: benchmarks/_baseline_worker.py) and as it is, one after the other,
each in a LocalCluster of its own.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import psutil

from _common import write_json
from p2pexec import LocalCluster
from tests.flood import Flood, libp2p_port

BASELINE = (sys.executable, str(Path(__file__).with_name("_baseline_worker.py")))


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def measure(program: tuple[str, ...] | None, size: int, seconds: float) -> dict[str, float]:
    with LocalCluster(workers=0) as lc:
        worker = lc.add_worker(program=program) if program else lc.add_worker()
        proc, port = psutil.Process(worker.pid), libp2p_port(worker.log_path)
        with lc.executor() as ex:
            ex.submit(pow, 2, 3).result(timeout=60)  # warm: the task process is up
        quiet_rss = proc.memory_info().rss
        latencies: list[float] = []
        failed = 0
        peak_rss = quiet_rss
        with Flood(port, "127.0.0.2", size) as one, Flood(port, "127.0.0.3", size) as two:
            cpu0, t0 = cpu_seconds(proc), time.monotonic()
            while time.monotonic() - t0 < seconds:
                started = time.monotonic()
                try:
                    with lc.executor() as ex:
                        ex.submit(pow, 2, 3).result(timeout=90)
                    latencies.append(time.monotonic() - started)
                except FutureTimeout:
                    failed += 1
                peak_rss = max(peak_rss, proc.memory_info().rss)
            wall = time.monotonic() - t0
            cpu = cpu_seconds(proc) - cpu0
            opened = one.opened + two.opened
    return {"results": len(latencies), "failed": failed,
            "latency_median_s": statistics.median(latencies) if latencies else float("nan"),
            "latency_max_s": max(latencies, default=float("nan")),
            "worker_cpu_percent": 100 * cpu / wall, "worker_rss_quiet_mb": quiet_rss / 2**20,
            "worker_rss_peak_mb": peak_rss / 2**20, "flood_sockets_opened": opened}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=300, help="idle sockets per attacker (default: 300)")
    parser.add_argument("--seconds", type=float, default=40.0, help="how long the flood runs, per worker")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    out = {"size": args.size, "seconds": args.seconds,
           "before": measure(BASELINE, args.size, args.seconds), "after": measure(None, args.size, args.seconds)}
    print(f"flood: 2 addresses x {args.size} idle sockets, re-opened when closed, for {args.seconds:g} s per worker")
    for name in ("before", "after"):
        m = out[name]
        print(f"{name:>6}: {m['results']} results ({m['failed']} timed out), latency median "
              f"{m['latency_median_s']:.2f} s, max {m['latency_max_s']:.2f} s; worker CPU "
              f"{m['worker_cpu_percent']:.0f}%, RSS {m['worker_rss_quiet_mb']:.0f} MB quiet, "
              f"{m['worker_rss_peak_mb']:.0f} MB peak; {m['flood_sockets_opened']} flood sockets opened")
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
