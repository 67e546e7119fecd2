"""P2PExecutor on a LocalCluster (2 workers x 1 slot) vs ProcessPoolExecutor(2) and loky(2), in one run.

    python benchmarks/bench_executor.py [--json results.json] [--roundtrips 500] [--items 5000]
                                        [--no-sandboxed]

Measures, for each executor: the median warm ``submit(noop).result()``
round trip, ``map(noop, range(items))`` throughput with chunksize 1 and of
4 x items with chunksize 100, and the time from constructing a new
executor to its first result; and again with the workers' task processes
sandboxed, as ``p2pexec-worker`` runs them by default.  The
P2PExecutor path is the real one: SSH board, worker daemons, libp2p
(Noise, yamux), secretstream, task processes; only the network is loopback.

loky (``pip install loky``, or the copy joblib ships as
``joblib.externals.loky``) is measured as a new ``loky.ProcessPoolExecutor(2)``
each time, like the stdlib pool (not ``get_reusable_executor``, which would
keep its processes between executors).  Without loky its column is skipped
with a note.  The table ends with issue 16's small-task targets, each
against its baseline from this run, and says pass or fall short.
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


def loky_pool() -> Callable[[], Executor] | None:
    """A maker of loky process pools of 2, or None when neither loky nor joblib's copy is installed."""
    try:
        from loky import ProcessPoolExecutor as LokyPool  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        try:
            from joblib.externals.loky import ProcessPoolExecutor as LokyPool  # type: ignore[import-untyped,no-redef,unused-ignore]
        except ImportError:
            return None
    return lambda: LokyPool(2)


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
    parser.add_argument("--no-sandboxed", action="store_true", help="skip the sandboxed P2PExecutor column")
    parser.add_argument("--only-p2p", action="store_true", help="skip the baselines (for profiling runs)")
    args = parser.parse_args()

    results: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                               "roundtrips": args.roundtrips, "items": args.items}
    loky = loky_pool()
    if not args.only_p2p:
        results["ProcessPoolExecutor(2)"] = measure(lambda: ProcessPoolExecutor(2), args.roundtrips, args.items)
        if loky is not None:
            results["loky(2)"] = measure(loky, args.roundtrips, args.items)
        else:
            print("loky is not installed (pip install loky, or joblib): its column is skipped")
    with LocalCluster(workers=2, slots=1) as lc:
        results["P2PExecutor(LocalCluster 2x1)"] = measure(lc.executor, args.roundtrips, args.items)
    layer = detect().layer
    if layer is not None and not args.no_sandboxed:  # what p2pexec-worker does by default: sandboxed tasks
        with LocalCluster(workers=2, slots=1, sandbox=True) as lc:
            results[f"P2PExecutor(sandboxed: {layer})"] = measure(lc.executor, args.roundtrips, args.items)

    columns = [(name, results[name]) for name in ("ProcessPoolExecutor(2)", "loky(2)",
                                                  "P2PExecutor(LocalCluster 2x1)", f"P2PExecutor(sandboxed: {layer})")
               if name in results]
    rows = [("warm submit(noop).result(), median", "roundtrip_ms", "ms"),
            (f"map(noop, range({args.items})), chunksize 1", "map_tasks_per_s", "tasks/s"),
            (f"map(noop, range({4 * args.items})), chunksize 100", "map_chunked_tasks_per_s", "tasks/s"),
            ("new executor to first result, median of 5", "first_result_ms", "ms")]
    heads = {"ProcessPoolExecutor(2)": "ProcessPool(2)", "loky(2)": "loky(2)",
             "P2PExecutor(LocalCluster 2x1)": "P2PExecutor"}
    print(f"{'measure':<48}" + "".join(f" {heads.get(name, 'sandboxed'):>18}" for name, _ in columns))
    for label, key, unit in rows:
        print(f"{label:<48}" + "".join(f" {col[key]:>12.2f} {unit:<5}" for _, col in columns))
    targets = verdicts(results, layer)
    if targets:
        print("\nissue 16, small tasks at local-pool speed:")
        for line in targets:
            print("  " + line)
        results["targets"] = targets
    write_json(args.json, results)
    return 0


def verdicts(results: dict[str, Any], layer: str | None) -> list[str]:
    """Each small-task target against its baseline from this run: pass or fall short."""
    pool, loky = results.get("ProcessPoolExecutor(2)"), results.get("loky(2)")
    out = []
    for name in ("P2PExecutor(LocalCluster 2x1)", f"P2PExecutor(sandboxed: {layer})"):
        ours = results.get(name)
        if ours is None:
            continue
        checks = []
        if loky is not None:
            checks += [("warm round trip <= 3x loky's", ours["roundtrip_ms"], 3 * loky["roundtrip_ms"], "ms", True),
                       ("map chunksize 1 >= loky's", ours["map_tasks_per_s"], loky["map_tasks_per_s"], "/s", False),
                       ("first result <= loky's", ours["first_result_ms"], loky["first_result_ms"], "ms", True)]
        if pool is not None:
            checks.append(("map chunksize 100 >= 0.8x ProcessPool's", ours["map_chunked_tasks_per_s"],
                           0.8 * pool["map_chunked_tasks_per_s"], "/s", False))
        for what, value, bound, unit, at_most in checks:
            ok = value <= bound if at_most else value >= bound
            out.append(f"{name}: {what}: {value:.2f} {unit} vs {bound:.2f} {unit}: "
                       f"{'pass' if ok else 'falls short'}")
    return out


if __name__ == "__main__":
    sys.exit(main())
