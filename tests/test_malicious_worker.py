"""A worker that tampers with its answers is dropped; its tasks run on another worker."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from p2pexec import LocalCluster
from p2pexec.config import resolve
from p2pexec.status import collect

from .conftest import wait_until

pytestmark = pytest.mark.timeout(120)

EVIL_WORKER = str(Path(__file__).parent / "doubles" / "evil_worker.py")


def square(x):
    return x * x


@pytest.mark.parametrize("mode", ["tamper", "garbage", "wrong-id"])
def test_a_worker_breaking_the_protocol_is_dropped_and_its_tasks_run_elsewhere(mode, caplog):
    with LocalCluster(workers=0) as lc, caplog.at_level(logging.WARNING, logger="p2pexec.client"):
        evil = lc.add_worker(program=[sys.executable, EVIL_WORKER, mode], user=lc.owner)  # another member's
        with lc.executor() as ex:
            first = ex.submit(square, 7)  # only the evil worker is online: it gets this task
            wait_until(lambda: "broke the protocol" in caplog.text, what="the client to drop the evil worker")
            assert not first.done()  # its answer was refused, and the task went back in the queue
            lc.add_worker()
            assert first.result(timeout=60) == 49
            assert list(ex.map(square, range(40))) == [x * x for x in range(40)]
        assert caplog.text.count("broke the protocol") == 1  # never leased again
        assert evil.popen.poll() is None  # (it carries on; we just stopped talking to it)


def test_a_ban_holds_for_the_member_whatever_peer_id_its_next_worker_has(caplog):
    with LocalCluster(workers=0) as lc, caplog.at_level(logging.DEBUG, logger="p2pexec.client"):
        lc.add_worker(program=[sys.executable, EVIL_WORKER, "tamper"], user=lc.owner)
        with lc.executor() as ex:
            first = ex.submit(square, 3)
            wait_until(lambda: "broke the protocol" in caplog.text, what="the client to drop the evil worker")
            lc.workers[0].kill()
            lc.add_worker(user=lc.owner)  # the same member again, a new process and libp2p peer id
            wait_until(lambda: "ignoring an offer from alice: a worker of alice broke the protocol" in caplog.text,
                       what="the restarted worker's offer to be refused")
            lc.add_worker()  # another member's worker runs it
            assert first.result(timeout=60) == 9
            who = resolve(lc.cluster, board=lc.board, identity=lc.worker_identity, members=lc.members,
                          user=lc.worker_user)
            clients = collect(who, 1.0, known_hosts=lc.known_hosts)["clients"]  # what `p2pexec status` shows
            assert [c["banned"] for c in clients] == [{"alice": clients[0]["banned"]["alice"]}], clients
            assert "tampered" in clients[0]["banned"]["alice"]


def test_allow_uses_only_the_members_named(caplog):
    with LocalCluster(workers=0) as lc, caplog.at_level(logging.DEBUG, logger="p2pexec.client"):
        lc.add_worker(user=lc.owner)
        with lc.executor(allow=["friend"]) as ex:
            future = ex.submit(square, 4)
            wait_until(lambda: "ignoring an offer from alice: not in this executor's allow=" in caplog.text,
                       what="alice's offer to be refused")
            assert not future.done()
            lc.add_worker()  # friend's
            assert future.result(timeout=60) == 16
