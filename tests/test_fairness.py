"""Several clients share workers: a long queue cannot hold every slot while another client waits."""

from __future__ import annotations

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
