"""One P2PExecutor job, run as a script inside a lab namespace by LabCluster.run_client.

Usage: python client_job.py '{"cluster": ..., "board": ..., "identity": ..., "members": ...,
                              "known_hosts": ..., "tasks": 8, "timeout": 60, "kwargs": {...},
                              "log_level": null | "INFO" | "DEBUG", "sleep": 0.0, "until_upgraded": 0}'

Prints exactly ONE JSON line on stdout and exits 0:
    {"results": [[x*x, worker], ...], "first": [1, worker], "kept_busy": n, "first_result_s": s, "map_s": s,
     "executor_s": s, "import_s": s, "total_s": s, "workers": [...]}
(times from after the p2pexec import: executor_s to build P2PExecutor, first_result_s to the first
result, map_s for the map after it; total_s includes the shutdown.)
or, on any failure, {"error": repr(exc), ...} and exits 1 (3 when its own deadline passes).

With ``until_upgraded`` (seconds), short tasks (``kept_busy`` of them, two at a
time, arguments -1, -2...) keep the relayed lease busy until it moved to a
direct connection (or that long), before the map: hole
punching takes 1-3 s, or 15 s and more when a punch stalls on a busy machine,
and an upgrade cut short by the end of the work is never seen.

It runs as ``__main__`` on purpose: ``square`` then travels to the worker by
value (dill), as a user's script function would.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Any

_process_start = time.monotonic()
_print_lock = threading.Lock()
_printed = False


def square(x: int, sleep: float = 0.0) -> list[Any]:
    """x*x and who ran it: LAB_WORKER is set only in the worker's environment (LabCluster.start_worker)."""
    import os
    import socket
    import time

    time.sleep(sleep)  # long enough tasks keep a lease alive while it is upgraded to a direct connection
    if os.environ.get("LAB_RUNLOG"):  # one line per run, so a test can tell a rerun from a single run
        with open(os.environ["LAB_RUNLOG"], "a") as runs:
            runs.write(f"{x}\n")

    return [x * x, os.environ.get("LAB_WORKER") or f"{socket.gethostname()}:{os.getpid()}"]




class _Moved(logging.Handler):
    """Sets ``event`` once the client logs that a lease moved to a direct connection."""

    def __init__(self, event: threading.Event) -> None:
        super().__init__(logging.INFO)
        self.event = event

    def emit(self, record: logging.LogRecord) -> None:
        if "moved to a direct connection" in record.getMessage():
            self.event.set()


def emit(payload: dict[str, Any]) -> None:
    """Print the one result line (whoever comes first: the job or the deadline)."""
    global _printed
    with _print_lock:
        if not _printed:
            _printed = True
            sys.stdout.write(json.dumps(payload) + "\n")
            sys.stdout.flush()


def _deadline_passed(timeout: float) -> None:
    emit({"error": f"client_job deadline of {timeout:g} s passed"})
    os._exit(3)  # a stuck shutdown must not keep the process alive


def main(argv: list[str]) -> int:
    config = json.loads(argv[1])
    timeout = float(config.get("timeout", 60))
    watchdog = threading.Timer(timeout, _deadline_passed, args=(timeout,))
    watchdog.daemon = True
    watchdog.start()
    if config.get("log_level"):  # P2PExecutor logs through `logging`; a script must configure it
        logging.basicConfig(level=config["log_level"], stream=sys.stderr,
                            format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    from p2pexec import P2PExecutor  # import time (libp2p: ~0.5 s) is reported apart

    start = time.monotonic()
    import_s = start - _process_start

    def remaining() -> float:
        return max(0.1, timeout - (time.monotonic() - start))

    moved = threading.Event()
    keep_busy = float(config.get("until_upgraded", 0))
    if keep_busy:
        logging.getLogger("p2pexec").setLevel(min(logging.INFO, logging.getLogger("p2pexec").getEffectiveLevel()))
        logging.getLogger("p2pexec").addHandler(_Moved(moved))
    try:
        with P2PExecutor(config["cluster"], board=config["board"], identity=config["identity"],
                         members=config["members"], known_hosts=config["known_hosts"],
                         **config.get("kwargs", {})) as ex:
            created = time.monotonic()
            first = ex.submit(square, 1).result(timeout=remaining())
            got_first = time.monotonic()
            busy_until, kept_busy = got_first + keep_busy, 0  # (those tasks take -1, -2...: their runs count too)
            while keep_busy and not moved.is_set() and time.monotonic() < busy_until:
                pair = [ex.submit(square, -(kept_busy + i), 0.3) for i in (1, 2)]  # one runs, one waits: both move
                kept_busy += 2
                for future in pair:
                    future.result(timeout=remaining())
            tasks = int(config.get("tasks", 8))
            results = list(ex.map(square, range(tasks), [float(config.get("sleep", 0.0))] * tasks,
                                  timeout=remaining()))
            mapped = time.monotonic()
    except BaseException as exc:  # report anything, KeyboardInterrupt included, as the one JSON line
        emit({"error": repr(exc), "elapsed_s": round(time.monotonic() - start, 3)})
        return 1
    emit({"results": results, "first": first, "workers": sorted({w for _, w in [first, *results]}),
          "kept_busy": kept_busy, "import_s": round(import_s, 4), "executor_s": round(created - start, 4),
          "first_result_s": round(got_first - start, 4), "map_s": round(mapped - got_first, 4),
          "total_s": round(time.monotonic() - start, 4)})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
