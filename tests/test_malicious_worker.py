"""A worker that tampers with its answers is dropped; its tasks run on another worker."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from p2pexec import LocalCluster

from .conftest import wait_until

pytestmark = pytest.mark.timeout(120)

EVIL_WORKER = str(Path(__file__).parent / "doubles" / "evil_worker.py")


def square(x):
    return x * x


@pytest.mark.parametrize("mode", ["tamper", "garbage", "wrong-id"])
def test_a_worker_breaking_the_protocol_is_dropped_and_its_tasks_run_elsewhere(mode, caplog):
    with LocalCluster(workers=0) as lc, caplog.at_level(logging.WARNING, logger="p2pexec.client"):
        evil = lc.add_worker(program=[sys.executable, EVIL_WORKER, mode])
        with lc.executor() as ex:
            first = ex.submit(square, 7)  # only the evil worker is online: it gets this task
            wait_until(lambda: "broke the protocol" in caplog.text, what="the client to drop the evil worker")
            assert not first.done()  # its answer was refused, and the task went back in the queue
            lc.add_worker()
            assert first.result(timeout=60) == 49
            assert list(ex.map(square, range(40))) == [x * x for x in range(40)]
        assert caplog.text.count("broke the protocol") == 1  # never leased again
        assert evil.popen.poll() is None  # (it carries on; we just stopped talking to it)
