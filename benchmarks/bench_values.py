"""A big argument given to many tasks: one task vs ``map(f, [array] * 40)``, in one run.

    python benchmarks/bench_values.py [--json results.json] [--mib 64] [--tasks 40]

For each executor: the time of one ``submit(f, array).result()`` with a
``--mib`` MiB NumPy array (on a warm executor, a fresh array: it has
not crossed yet), the time of ``list(map(f, [other] * tasks))`` with
another fresh array of the same size, their ratio, and for P2PExecutor
the payload bytes sent to workers (``ex.stats().bytes_sent``: what the
encrypted stream carries, less about 0.01% of framing and tags).

Executors: ProcessPoolExecutor(2), the baseline; P2PExecutor on a
LocalCluster (2 workers x 1 slot) without big values (each task carries
the array, as before values crossed once); with the workers' value cache
off (``--cache-size 0``: values are still sent apart, but again with
every task); as it runs by default; and on one worker with two slots
(which may go to two leases: the value must still cross once).  The path is the real one: SSH
board, worker daemons, libp2p, sealed channels, task processes; only the
network is loopback, so a home uplink would make the byte counts matter
far more than these times show.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Any, Callable

import numpy as np

from _common import verdict, write_json
from p2pexec import LocalCluster, P2PExecutor
from p2pexec.protocol import values as wire

MIB = 1 << 20


def total(a: np.ndarray) -> float:
    return float(a.sum())


def noop(x: Any = None) -> Any:
    return x


def measure(ex: Executor, mib: int, tasks: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    one, many = rng.random(mib * MIB // 8), rng.random(mib * MIB // 8)
    ex.submit(noop).result()
    list(ex.map(noop, range(4)))  # every worker leased
    sent = _sent(ex)
    started = time.perf_counter()
    assert ex.submit(total, one).result() == total(one)
    one_s = time.perf_counter() - started
    one_bytes = _sent(ex) - sent
    started = time.perf_counter()
    out = list(ex.map(total, [many] * tasks))
    map_s = time.perf_counter() - started
    assert out == [total(many)] * tasks
    result = {"one_task_s": one_s, "map_s": map_s, "ratio": map_s / one_s}
    if isinstance(ex, P2PExecutor):
        result.update(one_task_mib_sent=one_bytes / MIB, map_mib_sent=(_sent(ex) - sent - one_bytes) / MIB,
                      values_sent=ex.stats().values_sent, values_missed=ex.stats().values_missed)
    return result


def _sent(ex: Executor) -> int:
    return ex.stats().bytes_sent if isinstance(ex, P2PExecutor) else 0


def without_values(run: Callable[[], dict[str, float]]) -> dict[str, float]:
    """As before this change: no argument is big enough to travel apart."""
    saved, wire.HOIST_MIN = wire.HOIST_MIN, 1 << 62
    try:
        return run()
    finally:
        wire.HOIST_MIN = saved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=64, help="size of the array (default 64)")
    parser.add_argument("--tasks", type=int, default=40, help="tasks in the map (default 40)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()

    results: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count(), "mib": args.mib,
                               "tasks": args.tasks}
    with ProcessPoolExecutor(2) as pool:
        results["ProcessPoolExecutor(2)"] = measure(pool, args.mib, args.tasks, 1)
    with LocalCluster(workers=2, slots=1) as lc:
        with lc.executor() as ex:
            results["P2PExecutor, no values (before)"] = without_values(
                lambda: measure(ex, args.mib, args.tasks, 2))
        with lc.executor() as ex:
            results["P2PExecutor (values cross once)"] = measure(ex, args.mib, args.tasks, 3)
    with LocalCluster(workers=2, slots=1, worker_options=("--cache-size", "0")) as lc, lc.executor() as ex:
        results["P2PExecutor, --cache-size 0"] = measure(ex, args.mib, args.tasks, 4)
    with LocalCluster(workers=1, slots=2) as lc, lc.executor() as ex:  # its slots may go to two leases
        results["P2PExecutor, 1 worker x 2 slots"] = measure(ex, args.mib, args.tasks, 5)

    print(f"{args.mib} MiB array, map over {args.tasks} tasks; 2 workers x 1 slot")
    print(f"{'executor':<34} {'one task':>10} {'map':>10} {'ratio':>8} {'MiB sent: one':>14} {'map':>10}")
    for name in ("ProcessPoolExecutor(2)", "P2PExecutor, no values (before)", "P2PExecutor, --cache-size 0",
                 "P2PExecutor (values cross once)", "P2PExecutor, 1 worker x 2 slots"):
        r = results[name]
        sent = f"{r['one_task_mib_sent']:>14.1f} {r['map_mib_sent']:>10.1f}" if "map_mib_sent" in r else ""
        print(f"{name:<34} {r['one_task_s']:>8.2f} s {r['map_s']:>8.2f} s {r['ratio']:>7.1f}x {sent}")
    ours, before = results["P2PExecutor (values cross once)"], results["P2PExecutor, no values (before)"]
    results["target"] = (f"map over {args.tasks} within 4x of one task: {ours['ratio']:.1f}x "
                         f"(each task carrying the array: {before['ratio']:.1f}x; sent for the map "
                         f"{ours['map_mib_sent']:.0f} MiB against {before['map_mib_sent']:.0f}): "
                         f"{verdict(ours['ratio'] <= 4)}")
    slots2 = results["P2PExecutor, 1 worker x 2 slots"]
    results["once_per_worker"] = (f"on 1 worker x 2 slots, the map's array crossed {slots2['values_sent'] - 1} "
                                  f"time(s) ({slots2['map_mib_sent']:.0f} MiB sent): "
                                  f"{verdict(slots2['values_sent'] == 2)}")  # (one for the single task)
    print(f"\nissue 16, big values cross once: {results['target']}")
    print(f"issue 16, once per worker: {results['once_per_worker']}")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
