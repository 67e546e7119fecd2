"""P2PExecutor on a LocalCluster (2 workers x 1 slot) vs ProcessPoolExecutor(2), in one run.

    python benchmarks/bench_executor.py [--json results.json] [--roundtrips 500] [--items 5000]

Measures, for both executors: the median warm ``submit(noop).result()``
round trip, ``map(noop, range(items))`` throughput with chunksize 1 and of
4 x items with chunksize 100, and the time from constructing a new
executor to its first result; and again with the workers' task processes
sandboxed, as ``p2pexec-worker`` runs them by default.  The
P2PExecutor path is the real one: SSH board, worker daemons, libp2p
(Noise, yamux), secretstream, task processes; only the network is loopback.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Any, Callable

from _common import write_json
from p2pexec import LocalCluster
from p2pexec.worker.sandbox import detect


def noop(x: Any = None) -> Any:
    return x


def warm_roundtrip_ms(ex: Executor, n: int) -> float:
    for _ in range(20):
        ex.submit(noop).result()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        ex.submit(noop).result()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e3


def map_throughput(ex: Executor, items: int, chunksize: int = 1) -> float:
    list(ex.map(noop, range(100), chunksize=chunksize))
    started = time.perf_counter()
    out = list(ex.map(noop, range(items), chunksize=chunksize))
    elapsed = time.perf_counter() - started
    assert out == list(range(items))
    return items / elapsed


def first_result_ms(make: Callable[[], Executor], repeats: int = 5) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        with make() as ex:
            ex.submit(noop, 1).result()
            samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e3


def measure(make: Callable[[], Executor], roundtrips: int, items: int) -> dict[str, float]:
    with make() as ex:
        rt = warm_roundtrip_ms(ex, roundtrips)
        tput = map_throughput(ex, items)
        chunked = map_throughput(ex, 4 * items, chunksize=100)
    return {"roundtrip_ms": rt, "map_tasks_per_s": tput, "map_chunked_tasks_per_s": chunked,
            "first_result_ms": first_result_ms(make)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--roundtrips", type=int, default=500)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()

    results: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                               "roundtrips": args.roundtrips, "items": args.items}
    results["ProcessPoolExecutor(2)"] = measure(lambda: ProcessPoolExecutor(2), args.roundtrips, args.items)
    with LocalCluster(workers=2, slots=1) as lc:
        results["P2PExecutor(LocalCluster 2x1)"] = measure(lc.executor, args.roundtrips, args.items)
    layer = detect().layer
    if layer is not None:  # what p2pexec-worker does by default: task processes in the sandbox
        with LocalCluster(workers=2, slots=1, sandbox=True) as lc:
            results[f"P2PExecutor(sandboxed: {layer})"] = measure(lc.executor, args.roundtrips, args.items)

    base, ours = results["ProcessPoolExecutor(2)"], results["P2PExecutor(LocalCluster 2x1)"]
    boxed = results.get(f"P2PExecutor(sandboxed: {layer})")
    rows = [("warm submit(noop).result(), median", "roundtrip_ms", "ms"),
            (f"map(noop, range({args.items})), chunksize 1", "map_tasks_per_s", "tasks/s"),
            (f"map(noop, range({4 * args.items})), chunksize 100", "map_chunked_tasks_per_s", "tasks/s"),
            ("new executor to first result, median of 5", "first_result_ms", "ms")]
    print(f"{'measure':<44} {'ProcessPool(2)':>16} {'P2PExecutor':>16} {'ratio p2p/pool':>15}"
          + (f" {'sandboxed':>16} {'ratio':>7}" if boxed else ""))
    for label, key, unit in rows:
        print(f"{label:<44} {base[key]:>11.2f} {unit:<4} {ours[key]:>11.2f} {unit:<4} {ours[key] / base[key]:>14.2f}x"
              + (f" {boxed[key]:>11.2f} {unit:<4} {boxed[key] / base[key]:>6.2f}x" if boxed else ""))
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
