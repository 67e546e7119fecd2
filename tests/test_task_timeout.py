"""task_timeout: a task running too long fails with TimeoutError and is stopped on its worker; a worker that
never answers cannot hang result() or leaving the executor."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest

from p2pexec import LocalCluster

from .conftest import wait_until

pytestmark = pytest.mark.timeout(120)

EVIL_WORKER = str(Path(__file__).parent / "doubles" / "evil_worker.py")


def square(x):
    return x * x


def test_a_task_past_its_timeout_fails_and_frees_its_slot():
    with LocalCluster(workers=1) as lc, lc.executor(task_timeout=1) as ex:
        slow = ex.submit(time.sleep, 60)
        with pytest.raises(TimeoutError, match="task_timeout=1 s on worker friend"):
            slow.result(timeout=30)
        assert ex.submit(square, 5).result(timeout=30) == 25  # the one slot was freed: the task was stopped


def test_tasks_behind_a_slow_one_are_not_timed_out_before_they_run():
    """A task's clock started when it was sent, and tasks queued on the worker behind a slow one failed with
    "ran longer than task_timeout" without ever running."""
    with LocalCluster(workers=1) as lc, lc.executor(task_timeout=1) as ex:
        assert list(ex.map(square, range(20))) == [x * x for x in range(20)]  # short: the worker grants credit
        slow = ex.submit(time.sleep, 60)
        behind = [ex.submit(square, x) for x in range(2, 6)]
        with pytest.raises(TimeoutError):
            slow.result(timeout=30)
        assert [f.result(timeout=30) for f in behind] == [4, 9, 16, 25]


def test_a_worker_that_never_answers_cannot_hang_results_or_leaving(caplog):
    with LocalCluster(workers=0) as lc, caplog.at_level(logging.WARNING, logger="p2pexec.client"):
        lc.add_worker(program=[sys.executable, EVIL_WORKER, "silent"], user=lc.owner)
        with lc.executor(task_timeout=1) as ex:
            stuck = ex.submit(square, 1)
            queued = [ex.submit(square, x) for x in range(2, 5)]  # behind it, on the client
            with pytest.raises(TimeoutError, match="task_timeout=1 s on worker alice"):
                stuck.result(timeout=30)
            # it heartbeats but never answers the interrupt: dropped as broken, and the queue moves on
            wait_until(lambda: "did not stop task" in caplog.text, what="the silent worker to be dropped")
            lc.add_worker()
            assert [f.result(timeout=60) for f in queued] == [4, 9, 16]
        # leaving the `with` returned although the silent worker still holds the first task


def test_task_timeout_must_be_positive():
    with pytest.raises(ValueError, match="task_timeout"):
        from p2pexec import P2PExecutor

        P2PExecutor("alice/friends", task_timeout=0)
