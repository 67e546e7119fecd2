"""Two workers of one user on one machine: each says what it lends, and a starting one names what is lent twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from p2pexec import LocalCluster
from p2pexec.config import physical_memory
from p2pexec.protocol.resources import Resources
from p2pexec.worker.neighbours import registered

from .conftest import wait_until

LENT = Resources(1, 2, 1 << 30)


def _note(where: Path, pid: int, text: str | None = None) -> Path:
    path = where / f"{pid}.json"
    path.write_text(text if text is not None else json.dumps({"cluster": "bob/lab", "res": LENT.to_json()}))
    return path


def test_a_worker_sees_what_its_users_other_workers_lend_and_clears_what_the_dead_left(tmp_path):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True, timeout=60)
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    garbled = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        _note(tmp_path, other.pid)
        left = _note(tmp_path, int(ended.stdout))
        _note(tmp_path, garbled.pid, "{not json")
        (tmp_path / "notes.json").write_text("{}")
        with registered("alice/friends", Resources(2, 2, 2 << 30), tmp_path) as others:
            assert others == {f"the worker for bob/lab (pid {other.pid})": LENT}
            mine = json.loads((tmp_path / f"{os.getpid()}.json").read_text())
            assert mine["cluster"] == "alice/friends" and Resources.from_json(mine["res"]).slots == 2
        assert not (tmp_path / f"{os.getpid()}.json").exists()
        assert not left.exists()  # its worker was killed: nobody else would remove it
        assert (tmp_path / f"{garbled.pid}.json").exists()  # alive: being written, or not ours to judge
    finally:
        for process in (other, garbled):
            process.kill()
            process.wait()


def test_a_worker_started_beside_another_says_the_memory_is_lent_twice_and_clears_its_note(tmp_path):
    state = tmp_path / "state"
    (state / "p2pexec" / "workers").mkdir(parents=True)
    memory = physical_memory()
    assert memory, "this test needs the machine's memory size"
    neighbour = json.dumps({"cluster": "bob/lab", "res": Resources(1, 2, memory).to_json()})
    _note(state / "p2pexec" / "workers", os.getpid(), neighbour)  # (this test's process: alive)
    with LocalCluster(workers=0) as lc:
        log_path = tmp_path / "worker.log"
        with open(log_path, "wb") as log:  # started as a friend would, not as LocalCluster starts its own
            worker = subprocess.Popen(
                [sys.executable, "-m", "p2pexec.worker_cli", "--cluster", lc.cluster, "--board",
                 lc.board.replace(f"//{lc.owner}@", f"//{lc.worker_user}@", 1), "--identity", lc.worker_identity,
                 "--members", lc.members, "--known-hosts", lc.known_hosts, "--listen", "/ip4/127.0.0.1/tcp/0",
                 "--no-sandbox"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "XDG_STATE_HOME": str(state)})
        try:
            mine = state / "p2pexec" / "workers" / f"{worker.pid}.json"
            wait_until(lambda: " serving cluster " in log_path.read_text() or worker.poll() is not None,
                       timeout=60, what="the worker to join the board")
            text = log_path.read_text()
            assert ("this machine's other workers: this machine has" in text
                    and f"the worker for bob/lab (pid {os.getpid()})" in text
                    and "split it with --memory" in text), text
            assert json.loads(mine.read_text())["cluster"] == lc.cluster
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
    assert not mine.exists()
