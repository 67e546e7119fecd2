"""A worker cannot make the client allocate what it never sends, nor hand it a result over max_result_size."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from p2pexec import LocalCluster, ResultTooLargeError
from p2pexec.local import PeakMemory

pytestmark = pytest.mark.timeout(120)

EVIL_WORKER = str(Path(__file__).parent / "doubles" / "evil_worker.py")
MiB, GiB = 1 << 20, 1 << 30


def square(x):
    return x * x


def test_a_result_over_max_result_size_fails_its_future_and_the_next_task_runs():
    with LocalCluster(workers=1) as lc, lc.executor(max_result_size=MiB) as ex:
        with pytest.raises(ResultTooLargeError, match="over max_result_size=1048576; pass a larger"):
            ex.submit(bytes, 4 * MiB).result(timeout=60)
        assert ex.submit(square, 3).result(timeout=60) == 9
        assert len(ex.submit(bytes, MiB // 2).result(timeout=60)) == MiB // 2  # under the limit: fine


def test_a_claim_of_a_terabyte_costs_nothing():
    with LocalCluster(workers=0) as lc:
        lc.add_worker(program=[sys.executable, EVIL_WORKER, "huge-claim"], env={"EVIL_CLAIM": str(1 << 40)},
                      user=lc.owner)
        with lc.executor() as ex, PeakMemory() as memory:
            with pytest.raises(ResultTooLargeError, match="1099511627759-byte result for this task, over max_result_size"):
                ex.submit(square, 2).result(timeout=60)
        assert memory.growth < 256 * MiB, memory.growth


def test_memory_follows_what_arrived_not_what_was_announced():
    with LocalCluster(workers=0) as lc:
        lc.add_worker(program=[sys.executable, EVIL_WORKER, "huge-claim"], env={"EVIL_CLAIM": str(6 * GiB)},
                      user=lc.owner)
        with lc.executor(max_result_size=8 * GiB) as ex, PeakMemory() as memory:
            future = ex.submit(square, 2)
            lc.add_worker()  # the task runs here once the claimant falls silent and is given up
            assert future.result(timeout=60) == 4
        assert memory.growth < 256 * MiB, memory.growth  # 6 GiB were announced, 64 KiB sent
