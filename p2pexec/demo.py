"""``p2pexec demo``: a map through the whole path on a LocalCluster.

Kept apart from :mod:`p2pexec.local` so that the task function's module is
cheap to import in a fresh task process.
"""

from __future__ import annotations

import os
import time
from typing import Any


def square_where(x: int) -> tuple[int, int]:
    """x squared after 50 ms of pretend work, and which worker daemon ran it."""
    time.sleep(0.05)
    return x * x, os.getppid()  # a task process's parent is its worker daemon


def run_demo(workers: int = 2, tasks: int = 20) -> dict[str, Any]:
    from .local import LocalCluster

    started = time.perf_counter()
    with LocalCluster(workers=workers) as lc:
        ready = time.perf_counter()
        with lc.executor() as ex:
            pairs = list(ex.map(square_where, range(tasks)))
            done = time.perf_counter()
    return {"results": [r for r, _ in pairs], "workers_used": len({pid for _, pid in pairs}),
            "cluster_start_s": ready - started, "map_s": done - ready}
