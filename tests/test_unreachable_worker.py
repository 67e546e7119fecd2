"""A worker that cannot be reached fails loudly and cheaply: one warning, backoff, bounded board traffic."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest

from p2pexec import LocalCluster, NoWorkersError

pytestmark = pytest.mark.timeout(120)

EVIL_WORKER = str(Path(__file__).parent / "doubles" / "evil_worker.py")


def square(x):
    return x * x


def test_an_unreachable_worker_is_named_backed_off_and_does_not_stop_the_timeout(caplog):
    with LocalCluster(workers=0) as lc, caplog.at_level(logging.DEBUG, logger="p2pexec.client"):
        lc.add_worker(program=[sys.executable, EVIL_WORKER, "bogus-addrs"])
        board = lc.board_server()
        with lc.executor(worker_timeout=8, warn_after=4) as ex:
            lines_before, started = board.relayed, time.monotonic()
            future = ex.submit(square, 7)
            with pytest.raises(NoWorkersError) as failure:
                future.result(timeout=30)
            waited = time.monotonic() - started
            lines = board.relayed - lines_before
            message = str(failure.value)
            # the failing dials did not reset worker_timeout (it fired on time, not never)
            assert waited < 8 + 5, waited
            assert "could not be reached" in message and "friend" in message
            assert "/ip4/127.0.0.1/tcp/1: " in message, message  # which addresses were tried, and why
            assert "its relay did not take us" in message, message
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                        and r.message.startswith("cannot reach worker")]
            assert len(warnings) == 1, [r.message for r in warnings]  # named once, not per attempt
            attempts = caplog.text.count("cannot reach worker friend")
            assert 2 <= attempts <= 5, attempts  # retried with backoff (2 s, 4 s, ...), not in a hot loop
            assert lines <= 40, lines  # was hundreds a second: request, offer and accept per failed dial

            lc.add_worker()  # a reachable worker: the same executor carries on
            assert ex.submit(square, 8).result(timeout=60) == 64
