"""Two workers of one user on one machine: each notes what it lends, and a starting one names what is lent twice."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from p2pexec import LocalCluster
from p2pexec.config import physical_memory
from p2pexec.protocol.resources import Resources
from p2pexec.worker import neighbours
from p2pexec.worker.neighbours import directory, registered

from .conftest import wait_until

LENT = Resources(1, 2, 1 << 30)
HOLDER = textwrap.dedent("""
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
    os.write(fd, sys.argv[2].encode())
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("held", flush=True)
    sys.stdin.read()
""")


def _held(path: Path, text: str) -> subprocess.Popen[str]:
    """A note kept locked by another process, as a running worker keeps its own."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), text], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    return holder


def test_notes_of_running_workers_are_read_left_ones_removed_and_nothing_else_touched(tmp_path):
    note = json.dumps({"cluster": "bob/lab", "res": LENT.to_json()})
    running = _held(tmp_path / "41.json", note)
    garbled = _held(tmp_path / "42.json", "{not json")
    (tmp_path / "43.json").write_text(note)  # its worker was killed: nobody holds it
    os.mkfifo(tmp_path / "44.json")  # would block a plain read for ever
    (tmp_path / "45.json").symlink_to("/dev/zero")  # would never end
    (tmp_path / "99999999999999999999.json").write_text(note)  # no pid
    (tmp_path / "notes.json").write_text("{}")
    try:
        with registered("alice/friends", Resources(2, 2, 2 << 30), where=tmp_path) as others:
            assert others == {"the worker for bob/lab (pid 41)": LENT}
            mine = tmp_path / f"{os.getpid()}.json"
            assert json.loads(mine.read_text())["cluster"] == "alice/friends"
            assert mine.stat().st_mode & 0o077 == 0  # which clusters you serve is yours to tell
            with open(mine) as held, pytest.raises(BlockingIOError):
                fcntl.flock(held, fcntl.LOCK_SH | fcntl.LOCK_NB)  # held while the worker runs
        assert not mine.exists()
        assert not (tmp_path / "43.json").exists()
        assert {p.name for p in tmp_path.iterdir()} == {"41.json", "42.json", "44.json", "45.json",
                                                        "99999999999999999999.json", "notes.json"}
    finally:
        for holder in (running, garbled):
            holder.kill()
            holder.wait()


def test_of_two_workers_the_later_sees_the_earlier_and_a_local_clusters_note_nothing(tmp_path, monkeypatch):
    noted_first = []  # of two that start together, the later reader must find the other's note
    monkeypatch.setattr(neighbours, "_others", lambda where, mine, read=neighbours._others: (
        noted_first.append(mine.exists()), read(where, mine))[1])
    with registered("alice/friends", LENT, where=tmp_path) as first:
        assert first == {}
        # (a second worker of the same pid cannot be: the note's name is the pid; this reads as another would)
        (tmp_path / f"{os.getpid()}.json").rename(tmp_path / "1.json")
        with registered("bob/lab", LENT, where=tmp_path) as second:
            assert second == {"the worker for alice/friends (pid 1)": LENT}
        (tmp_path / "1.json").rename(tmp_path / f"{os.getpid()}.json")
    assert noted_first == [True, True]
    with registered("bob/lab", LENT, enabled=False, where=tmp_path) as none:
        assert none == {} and list(tmp_path.iterdir()) == []
    with LocalCluster(workers=1) as lc:
        assert not list(Path(lc.members).parent.glob("state/p2pexec/workers/*/*"))


def test_a_worker_started_beside_another_says_the_memory_is_lent_twice_and_clears_its_note(tmp_path, monkeypatch):
    memory = physical_memory()
    assert memory, "this test needs the machine's memory size"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    where = directory()
    where.mkdir(parents=True)
    with LocalCluster(workers=0) as lc:
        neighbour = _held(where / "7.json", json.dumps({"cluster": "bob/lab",
                                                        "res": Resources(1, 2, memory).to_json()}))
        log_path = tmp_path / "worker.log"
        with open(log_path, "wb") as log:  # started as a friend would, not as LocalCluster starts its own
            worker = subprocess.Popen(
                [sys.executable, "-m", "p2pexec.worker_cli", "--cluster", lc.cluster, "--board",
                 lc.board.replace(f"//{lc.owner}@", f"//{lc.worker_user}@", 1), "--identity", lc.worker_identity,
                 "--members", lc.members, "--known-hosts", lc.known_hosts, "--listen", "/ip4/127.0.0.1/tcp/0",
                 "--no-sandbox"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        mine = where / f"{worker.pid}.json"
        try:
            wait_until(lambda: " serving cluster " in log_path.read_text() or worker.poll() is not None,
                       timeout=60, what="the worker to join the board")
            text = log_path.read_text()
            assert ("lent twice: this machine has" in text and "the worker for bob/lab (pid 7)" in text
                    and "restart one of them with --memory" in text), text
            assert json.loads(mine.read_text())["cluster"] == lc.cluster
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
            neighbour.kill()
            neighbour.wait()
    assert not mine.exists()
