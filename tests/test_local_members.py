"""LocalCluster.add_member: a member with a key of their own runs tasks like anyone invited."""

from __future__ import annotations

from p2pexec import LocalCluster, current_worker


def test_an_added_member_runs_tasks_with_their_own_key():
    with LocalCluster(workers=0) as lc:
        carol = lc.add_member("carol")
        lc.add_worker()
        with lc.executor(**carol) as ex:
            assert ex.submit(pow, 2, 3).result(timeout=60) == 8
            assert ex.submit(current_worker).result(timeout=60).member == lc.worker_user
        assert "carol ssh-ed25519 " in open(lc.members).read()
