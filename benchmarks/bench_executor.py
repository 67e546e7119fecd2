"""P2PExecutor on a LocalCluster (2 workers x 1 slot) vs ProcessPoolExecutor(2), loky(2), Ray and dask, in one run.

    python benchmarks/bench_executor.py [--json results.json] [--roundtrips 500] [--items 5000]
                                        [--rounds 3] [--no-sandboxed]

Measures, for each executor: the median warm ``submit(noop).result()``
round trip, ``map(noop, range(items))`` throughput with chunksize 1 and of
20 x items with chunksize 100 (long enough that starting the map does not decide it), each after a short
map of the same function, and again for functions not mapped before (P2PExecutor groups a map's short
chunks in tasks once an earlier map showed them short: those two rows show a first map), and the time from
constructing a new executor to its first result; and again with the workers' task processes
sandboxed, as ``p2pexec-worker`` runs them by default.  The
P2PExecutor path is the real one: SSH board, worker daemons, libp2p
(Noise, yamux), sealed channels, task processes; only the network is loopback.

loky (``pip install loky``, or the copy joblib ships as
``joblib.externals.loky``) is measured as a new ``loky.ProcessPoolExecutor(2)``
each time, like the stdlib pool (not ``get_reusable_executor``, which would
keep its processes between executors).  Ray (2 CPUs) and dask.distributed
(2 worker processes of 1 thread) are measured warm through a small
``Executor`` over their own futures, the same shape as the others; they
have no chunked ``map`` and a new executor there is a new cluster, so those
two rows are left empty for them.  Each column is measured in a fresh
interpreter of its own, so that none inherits what another left behind.  ``pip install 'p2pexec[bench]'`` brings
loky, Ray and dask; each missing one's column is skipped with a note.  The
table ends with issue 16's small-task targets, each
against its baseline from this run, and says pass or fall short.

With ``--rounds N`` every column is measured N times, the columns taking
turns in a rotating order, so that a machine that slows down or speeds
up halfway (another user's job) weighs on every column alike.  The table
shows each measure's median over the rounds; each target is judged on
those medians and, to show how steady the verdict is, in each round
against that round's baseline.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Any, Callable

from _common import verdict, write_json
from p2pexec import LocalCluster
from p2pexec.worker.sandbox import detect

P2P = "P2PExecutor(LocalCluster 2x1)"
COLUMN_TIMEOUT = 600  # seconds for one column; Ray's start alone takes 10-20


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
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
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

        # silence_logs: at close, its scheduler warns of every finished task it "loses", thousands on one line
        self._cluster = DaskCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                    silence_logs=logging.ERROR)
        self._client = Client(self._cluster)
        self._executor = self._client.get_executor(pure=False)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return self._executor.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._client.close()
        self._cluster.close()


PEERS = {"Ray": ("ray", _RayExecutor), "dask": ("distributed", _DaskExecutor)}


def installed(module: str) -> bool:
    """Whether ``module`` could be imported, without importing it here (see :func:`measure_elsewhere`)."""
    return importlib.util.find_spec(module) is not None


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


def unmapped_1(x: Any = None) -> Any:
    return x


def unmapped_100(x: Any = None) -> Any:
    return x


def map_throughput(ex: Executor, items: int, chunksize: int = 1, fn: Callable[[Any], Any] = noop,
                   warm: bool = True) -> float:
    if warm:  # (and P2PExecutor learns how short noop's items are: its next maps put many chunks in a task)
        list(ex.map(fn, range(100), chunksize=chunksize))
    started = time.perf_counter()
    out = list(ex.map(fn, range(items), chunksize=chunksize))
    elapsed = time.perf_counter() - started
    assert out == list(range(items))
    return items / elapsed


def executor_life_ms(make: Callable[[], Executor], repeats: int = 5) -> dict[str, float]:
    """A new executor to its first result, and to the end of its shutdown (what a short script waits for)."""
    first, whole = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        with make() as ex:
            ex.submit(noop, 1).result()
            first.append(time.perf_counter() - started)
        whole.append(time.perf_counter() - started)
    return {"first_result_ms": statistics.median(first) * 1e3, "life_ms": statistics.median(whole) * 1e3}


def measure(make: Callable[[], Executor], roundtrips: int, items: int, pool: bool = True) -> dict[str, float]:
    """All four measures; a peer that is not a pool of its own (``pool=False``) gets the first two."""
    with make() as ex:
        out = {"roundtrip_ms": warm_roundtrip_ms(ex, roundtrips), "map_tasks_per_s": map_throughput(ex, items)}
        if pool:
            out["map_chunked_tasks_per_s"] = map_throughput(ex, 20 * items, chunksize=100)
            out["first_map_tasks_per_s"] = map_throughput(ex, items, 1, unmapped_1, warm=False)
            out["first_map_chunked_tasks_per_s"] = map_throughput(ex, 20 * items, 100, unmapped_100, warm=False)
    if pool:
        out.update(executor_life_ms(make))
    return out


def measure_column(name: str, roundtrips: int, items: int) -> dict[str, float]:
    """One column of the table, measured in this process."""
    if name == "ProcessPoolExecutor(2)":
        return measure(lambda: ProcessPoolExecutor(2), roundtrips, items)
    if name == "loky(2)":
        loky = loky_pool()
        assert loky is not None
        return measure(loky, roundtrips, items)
    if name in PEERS:
        return measure(PEERS[name][1], roundtrips, items, pool=False)
    with LocalCluster(workers=2, slots=1, sandbox=name != P2P) as lc:
        return measure(lc.executor, roundtrips, items)


def measure_elsewhere(name: str, roundtrips: int, items: int) -> dict[str, float]:
    """One column measured in a fresh interpreter: what one executor leaves behind (Ray's and dask's
    threads and processes, a heap of their objects for the garbage collector to walk) must not slow the
    next one.  Measured in one process, after them, p2pexec's client lost 10-25% of its throughput."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "column.json")
        subprocess.run([sys.executable, __file__, "--column", name, "--roundtrips", str(roundtrips),
                        "--items", str(items), "--json", out], check=True, timeout=COLUMN_TIMEOUT)
        with open(out) as f:
            column: dict[str, float] = json.load(f)
    return column


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--roundtrips", type=int, default=500)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every column this many times, in turns; report medians (default 1)")
    parser.add_argument("--no-sandboxed", action="store_true", help="skip the sandboxed P2PExecutor column")
    parser.add_argument("--only-p2p", action="store_true", help="skip the baselines (for profiling runs)")
    parser.add_argument("--column", help=argparse.SUPPRESS)  # measure this one column here (measure_elsewhere)
    args = parser.parse_args()
    if args.column:
        write_json(args.json, measure_column(args.column, args.roundtrips, args.items))
        return 0

    results: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                               "roundtrips": args.roundtrips, "items": args.items, "rounds": args.rounds}
    names = []
    if not args.only_p2p:
        names.append("ProcessPoolExecutor(2)")
        if loky_pool() is not None:
            names.append("loky(2)")
        else:
            print("loky is not installed (pip install loky, or joblib): its column is skipped")
        for name, (module, _) in PEERS.items():
            if installed(module):
                names.append(name)
            else:
                print(f"{name} is not installed (pip install 'p2pexec[bench]'): its column is skipped")
    names.append(P2P)
    layer = detect().layer
    if layer is not None and not args.no_sandboxed:  # what p2pexec-worker does by default: sandboxed tasks
        names.append(f"P2PExecutor(sandboxed: {layer})")
    rounds: list[dict[str, Any]] = [{} for _ in range(max(1, args.rounds))]
    for number, measured in enumerate(rounds):
        turn = number % len(names)
        for name in names[turn:] + names[:turn]:  # each round starts with another column
            measured[name] = measure_elsewhere(name, args.roundtrips, args.items)
    for name in names:
        results[name] = {key: statistics.median(r[name][key] for r in rounds) for key in rounds[0][name]}
        if len(rounds) > 1:
            results[name]["rounds"] = [r[name] for r in rounds]

    columns = [(name, results[name]) for name in ("ProcessPoolExecutor(2)", "loky(2)", "Ray", "dask",
                                                  P2P, f"P2PExecutor(sandboxed: {layer})")
               if name in results]
    rows = [("warm submit(noop).result(), median", "roundtrip_ms", "ms"),
            (f"map(noop, range({args.items})), chunksize 1", "map_tasks_per_s", "tasks/s"),
            (f"map(noop, range({20 * args.items})), chunksize 100", "map_chunked_tasks_per_s", "tasks/s"),
            ("  the same two, a function not mapped before:", "", ""),
            ("    chunksize 1", "first_map_tasks_per_s", "tasks/s"),
            ("    chunksize 100", "first_map_chunked_tasks_per_s", "tasks/s"),
            ("new executor to first result, median of 5", "first_result_ms", "ms"),
            ("  the same, through its shutdown", "life_ms", "ms")]
    heads = {"ProcessPoolExecutor(2)": "ProcessPool(2)", "loky(2)": "loky(2)", "Ray": "Ray", "dask": "dask",
             P2P: "P2PExecutor"}
    print(f"{'measure':<48}" + "".join(f" {heads.get(name, 'sandboxed'):>18}" for name, _ in columns))
    for label, key, unit in rows:
        if not key:
            print(label)
            continue
        print(f"{label:<48}" + "".join(f" {col[key]:>12.2f} {unit:<5}" if key in col else f" {'—':>18}"
                                       for _, col in columns))
    targets = verdicts(results, layer, rounds if len(rounds) > 1 else [])
    if targets:
        print("\nissue 16, small tasks at local-pool speed" + (f" (medians of {len(rounds)} rounds)" if len(rounds) > 1
                                                               else "") + ":")
        for line in targets:
            print("  " + line)
        results["targets"] = targets
    write_json(args.json, results)
    return 0


def checks(results: dict[str, Any], name: str) -> list[tuple[str, float, float, str, bool]]:
    """Column ``name``'s small-task targets: (what, its value, the bound from the baselines, unit, passed)."""
    pool, loky, ours = results.get("ProcessPoolExecutor(2)"), results.get("loky(2)"), results[name]
    out = []
    if loky is not None:
        out += [("warm round trip <= 3x loky's", ours["roundtrip_ms"], 3 * loky["roundtrip_ms"], "ms", True),
                ("map chunksize 1 >= loky's", ours["map_tasks_per_s"], loky["map_tasks_per_s"], "/s", False),
                ("first result <= loky's", ours["first_result_ms"], loky["first_result_ms"], "ms", True)]
        out.append(("  (first map of a function) chunksize 1 >= loky's", ours["first_map_tasks_per_s"],
                    loky["first_map_tasks_per_s"], "/s", False))
    if pool is not None:
        out.append(("map chunksize 100 >= 0.8x ProcessPool's", ours["map_chunked_tasks_per_s"],
                    0.8 * pool["map_chunked_tasks_per_s"], "/s", False))
        out.append(("  (first map of a function) chunksize 100 >= 0.8x ProcessPool's",
                    ours["first_map_chunked_tasks_per_s"], 0.8 * pool["first_map_chunked_tasks_per_s"], "/s", False))
    return [(what, value, bound, unit, value <= bound if at_most else value >= bound)
            for what, value, bound, unit, at_most in out]


def verdicts(results: dict[str, Any], layer: str | None, rounds: list[dict[str, Any]]) -> list[str]:
    """Each small-task target against its baseline: pass or fall short (on the medians), and in how many
    ``rounds`` it passed against that round's own baseline."""
    out = []
    for name in (P2P, f"P2PExecutor(sandboxed: {layer})"):
        if name not in results:
            continue
        passed = [sum(check[4] for check in column) for column in zip(*(checks(r, name) for r in rounds))]
        for i, (what, value, bound, unit, ok) in enumerate(checks(results, name)):
            steady = f" (pass in {passed[i]} of {len(rounds)} rounds)" if rounds else ""
            out.append(f"{name}: {what}: {value:.2f} {unit} vs {bound:.2f} {unit}: "
                       f"{verdict(ok)}{steady}")
    return out


if __name__ == "__main__":
    sys.exit(main())
