"""Many workers: a LocalCluster of N worker processes x 1 slot, map of short sleeps.

    python benchmarks/bench_scale.py [--workers 32] [--tasks 10000] [--json results.json]

Reports what the board costs as the cluster grows: lines it relayed per
task (leases, not tasks, should drive it) and the CPU time its threads
used, next to the map's wall time.  The board is embedded in this process;
its CPU is summed over its own threads (connection, session and SSH
transport threads).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import psutil

from _common import write_json
from p2pexec import LocalCluster
from p2pexec.board.ssh_transport import BoardTransport


def nap(_: int) -> None:
    time.sleep(0.001)


def board_cpu_seconds() -> float:
    ours = {t.native_id for t in threading.enumerate()
            if t.name.startswith("board-") or isinstance(t, BoardTransport)}
    return sum(t.user_time + t.system_time for t in psutil.Process().threads() if t.id in ours)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--tasks", type=int, default=10000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    started = time.perf_counter()
    with LocalCluster(workers=args.workers, slots=1) as lc:
        ready = time.perf_counter() - started
        board = lc.board_server()
        with lc.executor() as ex:
            lines_before, cpu_before = board.relayed, board_cpu_seconds()
            t = time.perf_counter()
            results = list(ex.map(nap, range(args.tasks)))
            wall = time.perf_counter() - t
            lines, cpu = board.relayed - lines_before, board_cpu_seconds() - cpu_before
    assert results == [None] * args.tasks
    out = {"workers": args.workers, "tasks": args.tasks, "cluster_start_s": ready, "map_wall_s": wall,
           "tasks_per_s": args.tasks / wall, "board_lines": lines, "board_lines_per_task": lines / args.tasks,
           "board_cpu_s": cpu, "ideal_wall_s": args.tasks * 0.001 / args.workers}
    print(f"{args.workers} workers x 1 slot, map of {args.tasks} x sleep(1 ms): {wall:.2f} s "
          f"({out['tasks_per_s']:.0f} tasks/s; ideal {out['ideal_wall_s']:.2f} s); cluster start {ready:.1f} s")
    print(f"board: {lines} lines relayed = {out['board_lines_per_task']:.4f} per task; "
          f"board CPU {cpu:.3f} s during the map")
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
