"""``p2pexec demo``: a map through the whole path on a LocalCluster.

Kept apart from :mod:`p2pexec.local` so that the task function's module is
cheap to import in a fresh task process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any


def square_where(x: int) -> tuple[int, int]:
    """x squared after 50 ms of pretend work, and which worker daemon ran it."""
    time.sleep(0.05)
    return x * x, os.getppid()  # a task process's parent is its worker daemon


Progress = Callable[[int, int, float], None]  # (results so far, tasks, seconds since the map started)


def run_demo(workers: int = 2, tasks: int = 20, progress: Progress = lambda done, total, seconds: None
             ) -> dict[str, Any]:
    """Run the demo map; ``progress`` is called as each result arrives (the CLI shows it)."""
    from .local import LocalCluster

    started = time.perf_counter()
    with LocalCluster(workers=workers) as lc:
        ready = time.perf_counter()
        with lc.executor() as ex:
            pairs = []
            for pair in ex.map(square_where, range(tasks)):
                pairs.append(pair)
                progress(len(pairs), tasks, time.perf_counter() - ready)
            done = time.perf_counter()
    return {"results": [r for r, _ in pairs], "workers_used": len({pid for _, pid in pairs}),
            "cluster_start_s": ready - started, "map_s": done - ready}
