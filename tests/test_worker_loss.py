"""A worker killed in the middle of a map: its tasks run elsewhere, every result arrives once."""

from __future__ import annotations

import os

import pytest

from p2pexec import LocalCluster

pytestmark = pytest.mark.timeout(120)


def run_once(args):
    index, marker_dir = args
    import time

    time.sleep(0.05)
    with open(os.path.join(marker_dir, f"{index}.{os.getppid()}"), "w"):
        pass  # one file per execution: who ran what, how often
    return index * 3


def test_sigkilled_worker_loses_no_task(tmp_path):
    with LocalCluster(workers=2) as lc, lc.executor() as ex:
        futures = [ex.submit(run_once, (i, str(tmp_path))) for i in range(60)]
        futures[5].result(timeout=60)
        victim = lc.workers[0]
        victim.kill()  # SIGKILL: no goodbye, its in-flight tasks are lost with it
        assert [f.result(timeout=60) for f in futures] == [3 * i for i in range(60)]
    runs = [name.split(".")[0] for name in os.listdir(tmp_path)]
    assert sorted(set(runs), key=int) == [str(i) for i in range(60)]  # every task ran
    # a task in flight on the victim may have run there before it died and again elsewhere;
    # no task ran twice on the same healthy worker
    survivor_runs = [n for n in os.listdir(tmp_path) if not n.endswith(f".{victim.pid}")]
    assert len(survivor_runs) == len(set(survivor_runs))


CLIENT = """
import sys, time
from p2pexec import P2PExecutor
ex = P2PExecutor("alice/friends", board=sys.argv[1], identity=sys.argv[2], members=sys.argv[3],
                 known_hosts=sys.argv[4])
future = ex.submit(time.sleep, 300)
while not future.running():
    time.sleep(0.01)
print("running", flush=True)
time.sleep(300)
"""


def test_worker_frees_the_slot_of_a_client_that_died(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    with LocalCluster(workers=1) as lc:
        client = subprocess.Popen([sys.executable, str(script), lc.board, lc.identity, lc.members, lc.known_hosts],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert client.stdout.readline().strip() == "running"  # it holds the only slot
        finally:
            client.kill()
            client.wait(10)
        with lc.executor() as ex:  # the slot is freed and the 300 s task stopped, or this would time out
            assert ex.submit(abs, -7).result(timeout=60) == 7
        assert lc.workers[0].popen.poll() is None
