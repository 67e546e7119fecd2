"""Seeing what runs: status --watch, ex.stats(), the no-worker warning's reasons, the worker's lease log and history."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from p2pexec import LocalCluster, TaskProcessDiedError
from p2pexec import ExecutorStats

from .conftest import wait_until

pytestmark = pytest.mark.timeout(120)


def maybe_fail(x):
    import os

    if x % 3 == 0:
        raise ValueError(os.getppid())  # the worker daemon that ran it
    return os.getppid()


def die(_):
    import os

    os._exit(3)


def _status_cmd(lc, *extra):
    return ["p2pexec", "status", lc.cluster, "--board", lc.board, "--identity", lc.identity,
            "--members", lc.members, "--known-hosts", lc.known_hosts, *extra]


def _settle(futures):
    return [f.exception(timeout=60) for f in futures]


def test_stats_count_exactly_overall_and_per_worker(cluster, caplog):
    caplog.set_level(logging.INFO, logger="p2pexec")
    with cluster.executor() as ex:
        assert ex.stats() == ExecutorStats()
        outcomes = _settle([ex.submit(maybe_fail, x) for x in range(20)])
        daemons = Counter()  # (daemon pid, failed?) -> tasks, from the tasks' own reports
        for x, exc in enumerate(outcomes):
            daemons[(exc.args[0], True) if exc else (None, False)] += 1
        seen_in_callback = []
        last = ex.submit(abs, -1)
        last.add_done_callback(lambda f: seen_in_callback.append(ex.stats()))  # may run on the loop thread
        last.result(timeout=60)
        stats = ex.stats()
    assert (stats.queued, stats.running, stats.done, stats.failed) == (0, 0, 14, 7)
    assert sum(w.done for w in stats.workers) == 14 and sum(w.failed for w in stats.workers) == 7
    assert {w.member for w in stats.workers} == {"friend"} and len({w.peer for w in stats.workers}) == len(stats.workers)
    assert {w.machine for w in stats.workers} <= {"local-0", "local-1"}  # one member's two machines, told apart
    leased = {r.getMessage().split(" of worker ")[1].split()[0] for r in caplog.records
              if r.getMessage().startswith("leased ")}
    assert {f"friend/{w.machine}" for w in stats.workers} <= leased <= {"friend/local-0", "friend/local-1"}, leased
    failed_per_daemon = sorted(n for (pid, failed), n in daemons.items() if failed)
    assert sorted(w.failed for w in stats.workers if w.failed) == failed_per_daemon
    assert len(seen_in_callback) == 1 and isinstance(seen_in_callback[0], ExecutorStats)


def test_status_watch_shows_workers_and_counts_refreshes_and_stops(cluster):
    with cluster.executor() as ex:
        _settle([ex.submit(maybe_fail, x) for x in range(10)])  # 0, 3, 6, 9 fail
        started = time.monotonic()
        plain = subprocess.run(_status_cmd(cluster, "--watch", "--for", "3.5"), capture_output=True, text=True,
                               timeout=60)
        elapsed = time.monotonic() - started
        lines = subprocess.run(_status_cmd(cluster, "--watch", "--for", "2.5", "--json"), capture_output=True,
                               text=True, timeout=60)
        interrupted = subprocess.Popen(_status_cmd(cluster, "--watch"), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
        try:
            first = interrupted.stdout.readline()  # a snapshot has begun: it is watching
            interrupted.send_signal(signal.SIGINT)
            assert interrupted.wait(30) == 0, interrupted.stderr.read()
        finally:
            interrupted.kill()
            interrupted.wait()
    assert plain.returncode == 0, plain.stderr
    assert elapsed < 3.5 + 20  # stopped by itself (generous: the board join and Python start count too)
    assert "\x1b" not in plain.stdout  # not a terminal: plain text
    blocks = [b for b in plain.stdout.split("\n\n") if b.strip()]
    assert len(blocks) >= 2, plain.stdout
    for block in blocks[-1:]:
        assert "2 worker(s)" in block, block
        assert sum(line.startswith(("  friend/local-0 ", "  friend/local-1 ")) for line in block.splitlines()) == 2, block
        assert "slots busy" in block and "cores" in block and "GiB" in block
        assert "done 6 " in block and "failed 4 " in block, block
    assert "cluster alice/friends" in first and "Traceback" not in interrupted.stderr.read()

    assert lines.returncode == 0, lines.stderr
    snapshots = [json.loads(line) for line in lines.stdout.splitlines()]
    assert len(snapshots) >= 2
    clients = [c for c in snapshots[-1]["clients"] if c.get("done") == 6]
    assert len(clients) == 1 and clients[0]["failed"] == 4
    assert all(w["cores"] >= 1 and w["memory"] > 0 and w["slots"] == 1 for w in snapshots[-1]["workers"])


def test_no_worker_warning_names_each_unusable_worker_and_why(caplog):
    with LocalCluster(workers=0) as lc:
        with caplog.at_level(logging.WARNING, logger="p2pexec.client"), lc.executor(warn_after=0.3) as ex:
            future = ex.submit(abs, 1)
            try:
                wait_until(lambda: any("a member must run: p2pexec-worker" in r.getMessage() for r in caplog.records),
                           what="the warning while nobody is there")
                lc.add_worker(env={"P2PEXEC_ADVERTISE_PYTHON": "2.7"})
                lc.worker_options += ("--allow", "bob")
                lc.add_worker(user="alice")  # refuses alice, the client

                def both_named() -> bool:  # the warning comes again, with the news
                    return any("friend: runs Python 2.7, this client 3." in r.getMessage() and
                               "alice: its worker serves only the members in its --allow, not alice" in r.getMessage()
                               for r in caplog.records)

                wait_until(both_named, what="a warning naming both workers and why")
            finally:
                future.cancel()
    warnings = [r for r in caplog.records if r.getMessage().startswith("no worker has run tasks")]
    assert len(warnings) <= 4, [r.getMessage() for r in warnings]  # rate-limited: repeated only with news
    assert "or a member runs a worker this client can use: p2pexec-worker --cluster alice/friends" in \
        warnings[-1].getMessage()


def test_no_worker_warning_names_workers_excluded_by_allow(caplog):
    with LocalCluster(workers=1) as lc, caplog.at_level(logging.WARNING, logger="p2pexec.client"):
        with lc.executor(allow=["carol"], warn_after=0.3) as ex:
            future = ex.submit(abs, 1)
            try:
                wait_until(lambda: any("friend: not in this executor's allow=" in r.getMessage()
                                       for r in caplog.records), what="the allow= reason")
            finally:
                future.cancel()


def test_worker_logs_each_lease_and_keeps_a_history(tmp_path):
    state = tmp_path / "state"
    with LocalCluster(workers=0) as lc:
        worker = lc.add_worker(env={"XDG_STATE_HOME": str(state)})
        with lc.executor() as ex:
            outcomes = _settle([ex.submit(maybe_fail, x) for x in (1, 2, 3)] + [ex.submit(die, 0)])
            assert isinstance(outcomes[2], ValueError) and isinstance(outcomes[3], TaskProcessDiedError)
        wait_until(lambda: "lease for alice ended" in worker.log_path.read_text(), what="the lease's log line")
        log_text = worker.log_path.read_text()
    assert "lease for alice ended after" in log_text and "4 task(s), 1 failed, 1 killed" in log_text, log_text
    assert "dropped a lease stream" not in log_text

    env = {**os.environ, "XDG_STATE_HOME": str(state)}
    table = subprocess.run(["p2pexec-worker", "--history"], capture_output=True, text=True, env=env, timeout=60)
    assert table.returncode == 0, table.stderr
    rows = table.stdout.splitlines()
    assert rows[0].split() == ["started", "member", "function", "seconds", "outcome"]
    assert sorted(row.split()[-1] for row in rows[1:5]) == ["failed", "killed", "ok", "ok"]
    assert all("alice" in row and "maybe_fail" in row for row in rows[1:4]) and "die" in rows[4], table.stdout

    as_json = subprocess.run(["p2pexec-worker", "--history", "2", "--json"], capture_output=True, text=True,
                             env=env, timeout=60)
    entries = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [(e["function"].rsplit(".", 1)[-1], e["outcome"]) for e in entries] == [("maybe_fail", "failed"),
                                                                                  ("die", "killed")]
    assert all(e["cluster"] == "alice/friends" and e["member"] == "alice" and e["seconds"] >= 0 for e in entries)


def test_worker_history_is_empty_before_anything_ran(tmp_path):
    done = subprocess.run([sys.executable, "-m", "p2pexec.worker_cli", "--history"], capture_output=True, text=True,
                          env={**os.environ, "XDG_STATE_HOME": str(tmp_path)}, timeout=60)
    assert done.returncode == 0 and "nothing has run" in done.stdout


def _send_reports(*names):
    import json
    import os
    import socket
    import struct
    import sys

    hop = socket.socket(fileno=os.dup(int(sys.argv[1])))  # the task process's socket to its daemon
    for name in names:
        data = json.dumps({"fn": name}).encode()
        hop.sendall(struct.pack(">BQQ", 2, 0, len(data)) + data)  # REPORT messages, as if from the task process
    return len(names)


def test_a_task_can_lie_about_its_name_but_not_flood_or_escape_the_friends_terminal(tmp_path):
    state = tmp_path / "state"
    with LocalCluster(workers=0) as lc:
        lc.add_worker(env={"XDG_STATE_HOME": str(state)})
        with lc.executor() as ex:
            assert ex.submit(_send_reports, "\x1b[2Jinnocent").result(timeout=60) == 1
            with pytest.raises(TaskProcessDiedError, match="broke the hop protocol"):
                ex.submit(_send_reports, "a", "b", "c").result(timeout=60)
            assert ex.submit(abs, -2).result(timeout=60) == 2  # the worker carries on
    env = {**os.environ, "XDG_STATE_HOME": str(state)}
    table = subprocess.run(["p2pexec-worker", "--history"], capture_output=True, text=True, env=env, timeout=60)
    rows = table.stdout.splitlines()[1:4]
    assert "?[2Jinnocent" in rows[0] and rows[0].split()[-1] == "ok" and "\x1b" not in table.stdout
    assert rows[1].split()[-1] == "killed" and "builtins.abs" in rows[2], table.stdout
    stored = subprocess.run(["p2pexec-worker", "--history", "--json"], capture_output=True, text=True, env=env,
                            timeout=60)
    assert json.loads(stored.stdout.splitlines()[0])["function"] == "?[2Jinnocent"  # cleaned before it is stored
