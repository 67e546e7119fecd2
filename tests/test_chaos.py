"""Chaos: a long map while workers are killed and started and the board restarts, at seeded random moments."""

from __future__ import annotations

import os
import random
import threading

import pytest

from p2pexec import LocalCluster

pytestmark = pytest.mark.timeout(240)

SEED = int(os.environ.get("P2PEXEC_CHAOS_SEED", "20261124"))
TASKS = 2000


def work(x):
    import time

    time.sleep(0.01)
    return x * x + 1


def test_map_survives_killed_workers_new_workers_and_board_restarts():
    rng = random.Random(SEED)
    first = ["kill", "start", "board"]  # each kind early on, whatever the seed
    rng.shuffle(first)
    actions = first + [rng.choice(["kill", "kill", "start", "start", "board"]) for _ in range(12)]
    done_events: list[str] = []
    map_finished = threading.Event()

    with LocalCluster(workers=3) as lc, lc.executor(max_retries=10) as ex:

        def chaos() -> None:
            for action in actions:
                if map_finished.wait(rng.uniform(0.2, 0.9)):  # the chaos schedule, not a stand-in for a condition
                    return
                alive = [w for w in lc.workers if w.popen.poll() is None]
                if action == "kill" and len(alive) > 1:
                    rng.choice(alive).kill()
                elif action == "start":
                    lc.add_worker()
                elif action == "board":
                    lc.restart_board()
                else:
                    continue
                done_events.append(action)

        agent = threading.Thread(target=chaos, name="chaos")
        agent.start()
        try:
            results = list(ex.map(work, range(TASKS), timeout=180))  # TimeoutError if any future hangs
        finally:
            map_finished.set()
            agent.join(60)
        during = list(done_events)

        assert results == [x * x + 1 for x in range(TASKS)], f"seed {SEED}"  # each once, in order
        assert {"kill", "board"} <= set(during), f"seed {SEED}: the map ended before the chaos ({during})"
        assert ex.submit(work, 3).result(timeout=60) == 10  # and the executor still works
