"""P2PExecutor on a LocalCluster (2 workers x 1 slot) vs ProcessPoolExecutor(2), loky(2), Ray and dask, in one run.

    python benchmarks/bench_executor.py [--json results.json] [--roundtrips 500] [--items 5000]
                                        [--no-sandboxed]

Measures, for each executor: the median warm ``submit(noop).result()``
round trip, ``map(noop, range(items))`` throughput with chunksize 1 and of
20 x items with chunksize 100 (long enough that starting the map does not decide it), and the time from constructing a new
executor to its first result; and again with the workers' task processes
sandboxed, as ``p2pexec-worker`` runs them by default.  The
P2PExecutor path is the real one: SSH board, worker daemons, libp2p
(Noise, yamux), secretstream, task processes; only the network is loopback.

loky (``pip install loky``, or the copy joblib ships as
``joblib.externals.loky``) is measured as a new ``loky.ProcessPoolExecutor(2)``
each time, like the stdlib pool (not ``get_reusable_executor``, which would
keep its processes between executors).  Ray (2 CPUs) and dask.distributed
(2 worker processes of 1 thread) are measured warm through a small
``Executor`` over their own futures, the same shape as the others; they
have no chunked ``map`` and a new executor there is a new cluster, so those
two rows are left empty for them.  ``pip install 'p2pexec[bench]'`` brings
loky, Ray and dask; each missing one's column is skipped with a note.  The
table ends with issue 16's small-task targets, each
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


class _RayExecutor(Executor):
    """Ray tasks behind the Executor interface: one remote function per callable, ObjectRef.future()."""

    def __init__(self) -> None:
        import ray  # type: ignore[import-not-found,import-untyped,unused-ignore]

        self._ray = ray
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        self._remote: dict[Callable[..., Any], Any] = {}

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = self._ray.remote(fn)
        return remote.remote(*args, **kwargs).future()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._ray.shutdown()


class _DaskExecutor(Executor):
    """dask.distributed's own ClientExecutor over a local cluster of 2 processes x 1 thread."""

    def __init__(self) -> None:
        from dask.distributed import Client, LocalCluster as DaskCluster  # type: ignore[import-not-found,import-untyped,unused-ignore]

        self._cluster = DaskCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        self._client = Client(self._cluster)
        self._executor = self._client.get_executor(pure=False)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return self._executor.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._client.close()
        self._cluster.close()


def peer_makers() -> dict[str, Callable[[], Executor]]:
    """Ray and dask where installed (the ``bench`` extra); a note for each one that is not."""
    makers: dict[str, Callable[[], Executor]] = {}
    for name, module, maker in (("Ray", "ray", _RayExecutor), ("dask", "distributed", _DaskExecutor)):
        try:
            __import__(module)
        except ImportError:
            print(f"{name} is not installed (pip install 'p2pexec[bench]'): its column is skipped")
            continue
        makers[name] = maker
    return makers


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


def measure(make: Callable[[], Executor], roundtrips: int, items: int, pool: bool = True) -> dict[str, float]:
    """All four measures; a peer that is not a pool of its own (``pool=False``) gets the first two."""
    with make() as ex:
        out = {"roundtrip_ms": warm_roundtrip_ms(ex, roundtrips), "map_tasks_per_s": map_throughput(ex, items)}
        if pool:
            out["map_chunked_tasks_per_s"] = map_throughput(ex, 20 * items, chunksize=100)
    if pool:
        out["first_result_ms"] = first_result_ms(make)
    return out


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
        for name, make in peer_makers().items():
            results[name] = measure(make, args.roundtrips, args.items, pool=False)
    with LocalCluster(workers=2, slots=1) as lc:
        results["P2PExecutor(LocalCluster 2x1)"] = measure(lc.executor, args.roundtrips, args.items)
    layer = detect().layer
    if layer is not None and not args.no_sandboxed:  # what p2pexec-worker does by default: sandboxed tasks
        with LocalCluster(workers=2, slots=1, sandbox=True) as lc:
            results[f"P2PExecutor(sandboxed: {layer})"] = measure(lc.executor, args.roundtrips, args.items)

    columns = [(name, results[name]) for name in ("ProcessPoolExecutor(2)", "loky(2)", "Ray", "dask",
                                                  "P2PExecutor(LocalCluster 2x1)", f"P2PExecutor(sandboxed: {layer})")
               if name in results]
    rows = [("warm submit(noop).result(), median", "roundtrip_ms", "ms"),
            (f"map(noop, range({args.items})), chunksize 1", "map_tasks_per_s", "tasks/s"),
            (f"map(noop, range({20 * args.items})), chunksize 100", "map_chunked_tasks_per_s", "tasks/s"),
            ("new executor to first result, median of 5", "first_result_ms", "ms")]
    heads = {"ProcessPoolExecutor(2)": "ProcessPool(2)", "loky(2)": "loky(2)", "Ray": "Ray", "dask": "dask",
             "P2PExecutor(LocalCluster 2x1)": "P2PExecutor"}
    print(f"{'measure':<48}" + "".join(f" {heads.get(name, 'sandboxed'):>18}" for name, _ in columns))
    for label, key, unit in rows:
        print(f"{label:<48}" + "".join(f" {col[key]:>12.2f} {unit:<5}" if key in col else f" {'—':>18}"
                                       for _, col in columns))
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
