"""joblib's p2pexec backend beside loky, in one run: many tiny calls (auto-batching), and a GridSearchCV.

    python benchmarks/bench_joblib.py [--calls 10000] [--repeat 9] [--json out.json]

Both run warm (each pool has served a call first) with 2 workers / 2 jobs on this machine; p2pexec goes
through the full path (board, libp2p, encryption, task processes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import verdict, write_json  # noqa: E402


def tiny(x: int) -> int:
    return x * x


def _time(run, repeat: int) -> float:
    run()  # warm: pool started, functions shipped
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=9, help="runs per measurement; the median counts")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import joblib
    from sklearn.datasets import load_digits
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    from p2pexec import LocalCluster

    def calls(n_jobs: int) -> None:
        joblib.Parallel(n_jobs=n_jobs)(joblib.delayed(tiny)(i) for i in range(args.calls))

    X, y = load_digits(return_X_y=True)

    def grid(n_jobs: int) -> None:
        GridSearchCV(SVC(), {"C": [1, 10], "gamma": [0.001, 0.0005]}, cv=3, n_jobs=n_jobs).fit(X, y)

    with joblib.parallel_config(backend="loky"):
        loky_calls, loky_grid = _time(lambda: calls(2), args.repeat), _time(lambda: grid(2), args.repeat)
    with LocalCluster(workers=2) as lc, lc.executor() as ex, joblib.parallel_config(backend="p2pexec", executor=ex):
        p2p_calls, p2p_grid = _time(lambda: calls(-1), args.repeat), _time(lambda: grid(-1), args.repeat)
    results = {"calls": args.calls, "loky_calls_s": loky_calls, "p2pexec_calls_s": p2p_calls,
               "calls_ratio": p2p_calls / loky_calls, "loky_grid_s": loky_grid, "p2pexec_grid_s": p2p_grid,
               "grid_ratio": p2p_grid / loky_grid}
    judged = verdict(results["calls_ratio"] <= 2)
    print(f"{args.calls} tiny calls: loky {loky_calls * 1000:.1f} ms, p2pexec {p2p_calls * 1000:.1f} ms "
          f"({results['calls_ratio']:.2f}x loky; target <= 2x: {judged})")
    print(f"GridSearchCV (digits, 12 fits): loky {loky_grid * 1000:.0f} ms, p2pexec {p2p_grid * 1000:.0f} ms "
          f"({results['grid_ratio']:.2f}x)")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
