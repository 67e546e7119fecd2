"""Fair sharing: a newcomer's first task behind a long queue, and two full queues side by side.

    python benchmarks/bench_fairness.py [--seconds 60] [--json results.json]

1. **Newcomer.**  2 workers x 2 slots.  Client A maps 60 one-second tasks
   over every slot; once they all run, client B submits one 0.1 s task.
   Reported: how long B's task waited to start, beside the same task on
   the idle cluster (the floor) in the same run.  Before fair sharing it
   waited for A's lease to end (17-27 s in issue 16).
2. **Two full queues.**  2 workers x 1 slot (the hardest case: a slot cannot
   be split, only taken in turns).  Two members' clients each keep 0.5 s
   tasks queued for ``--seconds``; reported: each one's share of the
   slot-seconds (the target is half each, within 10%).
"""

from __future__ import annotations

import argparse
import time
from typing import Any
from concurrent.futures import wait

from _common import verdict, write_json
from p2pexec import LocalCluster


def interval(seconds: float) -> tuple[float, float]:
    started = time.time()
    time.sleep(seconds)
    return started, time.time()


def newcomer() -> dict[str, float]:
    with LocalCluster(workers=2, slots=2) as lc:
        with lc.executor() as b:
            b.submit(interval, 0).result(timeout=60)  # warm: B's lease machinery, as in the busy case
            submitted = time.time()
            idle_wait = b.submit(interval, 0.1).result(timeout=60)[0] - submitted
        with lc.executor() as a, lc.executor() as b:
            hog = [a.submit(interval, 1.0) for _ in range(60)]
            b.submit(interval, 0).result(timeout=60)  # B is known to the workers (waits its turn here)
            while sum(f.running() for f in hog) < 4:
                time.sleep(0.01)
            submitted = time.time()
            b_started = b.submit(interval, 0.1).result(timeout=120)[0]
            queued = sum(not f.done() for f in hog)
            wait(hog, timeout=120)
            boundary = min(end for _, end in (f.result() for f in hog) if end > submitted)
    return {"idle cluster: B's task starts after (s)": round(idle_wait, 3),
            "A's 60 x 1 s queue on every slot: B's task starts after (s)": round(b_started - submitted, 3),
            "  of which waiting for the first of A's tasks to end (s)": round(boundary - submitted, 3),
            "  and the hand-over from that task's end to B's start (s)": round(b_started - boundary, 3),
            "A's tasks still queued or running then": queued}


def two_queues(seconds: float) -> dict[str, float]:
    with LocalCluster(workers=0) as lc:
        acting = {name: lc.add_member(name) for name in ("m1", "m2")}
        lc.add_workers(2)
        used: dict[str, float] = {}
        with lc.executor(**acting["m1"]) as one, lc.executor(**acting["m2"]) as two:
            futures: dict[str, list] = {"m1": [], "m2": []}
            start = time.time()
            while time.time() - start < seconds:
                for name, ex in (("m1", one), ("m2", two)):
                    live = sum(not f.done() for f in futures[name])
                    futures[name] += [ex.submit(interval, 0.5) for _ in range(8 - live)]
                time.sleep(0.05)
            end = time.time()
            for name, fs in futures.items():
                spans = [f.result(timeout=120) for f in fs]
                used[name] = sum(max(0.0, min(e, end) - max(s, start)) for s, e in spans)
    total = sum(used.values())
    return {f"{name}'s share of the slot-seconds": round(used[name] / total, 3) for name in used} | {
        "slot-seconds used of those available": round(total / (2 * (end - start)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    measured = {"newcomer": newcomer(), "two full queues": two_queues(args.seconds)}
    for part, numbers in measured.items():
        print(part)
        for name, value in numbers.items():
            print(f"  {name}: {value}")
    results: dict[str, Any] = {**measured, "targets": verdicts(measured)}
    print("\nissue 16, fair sharing:")
    for line in results["targets"]:
        print("  " + line)
    write_json(args.json, results)


def verdicts(results: dict[str, dict[str, float]]) -> list[str]:
    """Each fair-sharing target, pass or fall short: the newcomer's start beside its start on an idle
    cluster, each member's share beside half."""
    idle, busy = (results["newcomer"][k] for k in ("idle cluster: B's task starts after (s)",
                                                   "A's 60 x 1 s queue on every slot: B's task starts after (s)"))
    shares = {k.split("'")[0]: v for k, v in results["two full queues"].items() if "share" in k}
    fair = all(abs(share / 0.5 - 1) <= 0.10 for share in shares.values())
    return [f"a newcomer's first task starts within 1 s behind a full queue: {busy:.2f} s "
            f"(idle cluster: {idle:.2f} s): {verdict(busy <= 1.0)}",
            "two full queues each get half the slot-seconds, within 10%: "
            + ", ".join(f"{name} {share:.1%}" for name, share in shares.items())
            + f": {verdict(fair)}"]


if __name__ == "__main__":
    main()
