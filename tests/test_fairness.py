"""Several clients share workers: a long queue cannot hold every slot while another client waits."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from p2pexec import LocalCluster

pytestmark = pytest.mark.timeout(120)


def stamp_after(seconds):
    time.sleep(seconds)
    return time.time()


def test_a_waiting_client_gets_a_slot_before_a_long_queue_drains():
    with LocalCluster(workers=1, worker_options=("--lease-seconds", "0.5")) as lc:
        with lc.executor() as hog, lc.executor() as other:
            hog_futures = [hog.submit(stamp_after, 0.05) for _ in range(100)]  # ~5 s of work
            hog_futures[0].result(timeout=30)  # the hog holds the only slot
            finished_other = other.submit(stamp_after, 0).result(timeout=60)
            finished_hog = [f.result(timeout=60) for f in hog_futures]
    # the other client ran while the hog still had work queued, and the hog lost nothing
    assert finished_other < max(finished_hog)
    assert sum(t > finished_other for t in finished_hog) >= 10


def test_a_lease_gives_a_slot_to_a_newcomer_between_two_tasks_and_keeps_the_other():
    """Fair sharing, with the default --lease-seconds (30): the newcomer does not wait for the queue."""
    with LocalCluster(workers=1, slots=2) as lc:
        with lc.executor() as hog, lc.executor() as other:
            hog_futures = [hog.submit(stamp_after, 0.2) for _ in range(40)]  # ~4 s of work on 2 slots
            hog_futures[1].result(timeout=30)  # the hog holds both slots
            finished_other = other.submit(stamp_after, 0).result(timeout=60)
            finished_hog = sorted(f.result(timeout=60) for f in hog_futures)
        log = lc.workers[0].log_path.read_text()
    assert finished_other < finished_hog[-10]  # it ran while the hog still had work queued
    assert "gives a slot to alice" in log or "another client is waiting" in log  # moved between two tasks
    ended = [line for line in log.splitlines() if "ended after" in line]
    assert ended and all(line.endswith(" 0 killed") for line in ended), log[-6000:]  # no running task was stopped


def test_a_client_whose_slot_went_to_a_newcomer_counts_one_slot_less():
    """The worker tells the client (SLOTS): it fills its other slots first, asks for more, and joblib's
    n_jobs=-1 (``capacity``) counts what it holds."""
    said: dict[str, threading.Event] = {"leased 2 slot(s)": threading.Event(), "gave 1 of our slots": threading.Event()}

    class Listen(logging.Handler):
        def emit(self, record):
            for words, event in said.items():
                if words in record.getMessage():
                    event.set()

    handler, logger = Listen(), logging.getLogger("p2pexec.client")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with LocalCluster(workers=0, slots=2) as lc:
            with lc.executor() as hog, lc.executor() as other:
                hog_futures = [hog.submit(stamp_after, 0.2) for _ in range(40)]  # ~4 s of work on 2 slots
                lc.add_worker()  # it finds the hog asking for 40: both slots go in one lease, which can shrink
                assert said["leased 2 slot(s)"].wait(timeout=30) and hog.capacity(wait=0) == 2
                newcomer = other.submit(stamp_after, 4.0)  # holds the slot it gets: the hog cannot lease it back yet
                assert said["gave 1 of our slots"].wait(timeout=30), "the hog was not told that a slot went"
                assert hog.capacity(wait=0) == 1
                newcomer.result(timeout=60)
                assert len({f.result(timeout=60) for f in hog_futures}) == 40  # the hog lost nothing
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
