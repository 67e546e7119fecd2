"""The whole Friday-evening journey, as separate people with separate HOMEs, in a network namespace of its own.

The owner starts a board and invites two friends; each joins with one command; one lends a machine with
``p2pexec-worker --cluster alice/friends`` and nothing else, the other uses ``P2PExecutor("alice/friends")``
and nothing else; the owner removes the lending friend, and within 10 s that worker runs nothing more.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from p2pexec.keys import generate_identity_file

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                 reason="needs root and ip to make a network namespace")]

CLIENT = r"""
import sys, time
from p2pexec import P2PExecutor

def mark():
    import p2pexec
    return p2pexec.current_worker().member

with P2PExecutor("alice/friends") as ex:
    print("ready", ex.submit(mark).result(timeout=120), flush=True)
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        sent = time.time()
        try:
            where = ex.submit(mark).result(timeout=60)
        except Exception as exc:
            where = "error:" + type(exc).__name__ + ": " + str(exc)
        print(f"{sent:.3f} {where}", flush=True)
        time.sleep(0.1)  # a steady trickle of tasks, not a wait for anything
"""


class Lines:
    """A process's stdout lines, read by a thread so the test can wait on them with a deadline."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.queue = proc, queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.queue.put(line.rstrip("\n"))
        self.queue.put(None)

    def next(self, timeout: float) -> str:
        line = self.queue.get(timeout=timeout)
        if line is None:
            raise AssertionError(f"process ended ({self.proc.poll()}) before the line we waited for")
        return line

    def until(self, predicate, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}")
            try:
                line = self.next(left)
            except queue.Empty:
                raise AssertionError(f"timed out waiting for {what}") from None
            if predicate(line):
                return line


@pytest.fixture
def netns():
    name = f"p2pj-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield ["ip", "netns", "exec", name]
    finally:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", name], check=False)


class People:
    """Each person is a HOME; commands run in the namespace with only that HOME in their environment."""

    def __init__(self, root: Path, prefix: list[str]) -> None:
        self.root, self.prefix, self.procs = root, prefix, []
        self.base = {k: v for k, v in os.environ.items() if not k.startswith(("P2PEXEC_", "XDG_", "SSH_"))}

    def env(self, who: str, **extra: str) -> dict[str, str]:
        home = self.root / who
        (home / "tmp").mkdir(parents=True, exist_ok=True)  # what killed workers leave goes with tmp_path
        return {**self.base, "HOME": str(home), "USER": who, "LOGNAME": who, "TMPDIR": str(home / "tmp"), **extra}

    def run(self, who: str, *argv: str, fails: bool = False, **extra: str) -> str:
        """``argv``'s output; it must succeed, or with ``fails``, fail (its error output then)."""
        done = subprocess.run([*self.prefix, *argv], env=self.env(who, **extra), capture_output=True, text=True,
                              timeout=60)
        assert (done.returncode != 0) == fails, f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done.stderr if fails else done.stdout

    def start(self, who: str, *argv: str, log: str | None = None, **extra: str) -> subprocess.Popen:
        out = open(self.root / log, "w") if log else subprocess.PIPE
        proc = subprocess.Popen([*self.prefix, *argv], env=self.env(who, **extra), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, text=True)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait(timeout=10)


def test_invite_join_lend_use_and_remove(tmp_path, netns):
    people = People(tmp_path, netns)
    try:
        _journey(people, tmp_path)
    finally:
        people.stop()


def _journey(people: People, tmp_path: Path) -> None:
    p2pexec, worker = shutil.which("p2pexec"), shutil.which("p2pexec-worker")
    assert p2pexec and worker
    alice_key = tmp_path / "alice" / ".ssh" / "id_ed25519"
    people.env("alice")
    generate_identity_file(alice_key)
    users = tmp_path / "users.txt"
    users.write_text(f"alice {(alice_key.parent / 'id_ed25519.pub').read_text()}")

    board = Lines(people.start("alice", p2pexec, "board", "--listen", "127.0.0.1:2222", "--users", str(users),
                               "--state", str(tmp_path / "board")))
    board.until(lambda line: "listening on 127.0.0.1:2222" in line, 30, "the board to listen")

    codes = {}
    for friend in ("bob", "carol"):
        out = people.run("alice", p2pexec, "invite", "alice/friends", friend,
                         "--board", "ssh://alice@127.0.0.1:2222", "--accept-new-host-key")
        codes[friend] = out.strip().splitlines()[-1]
        assert codes[friend].startswith("p2pexec1:")
        assert ("created the cluster alice/friends" in out) == (friend == "bob"), out

    for argv in (("invite", "alice/friends", "alice"), ("remove", "alice/friends", "alice")):
        said = people.run("alice", p2pexec, *argv, fails=True)  # an invitation in her name: a login as her
        assert "alice owns alice/friends" in said, said

    for friend in ("bob", "carol"):  # one command each, no key of their own yet
        out = people.run(friend, p2pexec, "join", codes[friend])
        assert "created a key for p2pexec" in out and f"joined alice/friends as {friend}" in out, out
        assert (tmp_path / friend / ".ssh").stat().st_mode & 0o777 == 0o700  # (its known_hosts: as ssh makes it)

    # Codes used again: by their friend (nothing to do), on another's machine (it was someone's identity
    # switched silently), on a new machine (the board lets nobody in with it: "ask for an invitation (p2pexec
    # invite OWNER/NAME ...)" said nothing of a spent code)
    said = people.run("bob", p2pexec, "join", codes["bob"], fails=True)
    assert "you joined alice/friends as bob before" in said and "p2pexec status alice/friends" in said, said
    said = people.run("bob", p2pexec, "join", codes["carol"], fails=True)
    assert "this machine joined alice/friends as bob already, and this code invites carol" in said, said
    said = people.run("dave", p2pexec, "join", codes["carol"], fails=True)
    assert "the board did not let carol in: this invitation code was used already, or has expired" in said, said
    assert "p2pexec invite alice/friends carol" in said and "OWNER/NAME" not in said, said

    bobs_worker = people.start("bob", worker, "--cluster", "alice/friends", log="bob-worker.log")
    client = Lines(people.start("carol", sys.executable, "-c", CLIENT))
    first = client.until(lambda line: line.startswith("ready"), 120, "carol's first result")
    assert first == "ready bob"

    # Inviting bob again (a second machine, say) must not lock out the key he joined with.
    people.run("alice", p2pexec, "invite", "alice/friends", "bob")
    again = time.time()
    client.until(lambda line: line[:1].isdigit() and float(line.split()[0]) >= again + 5 and line.endswith(" bob"),
                 60, "bob's worker to keep serving after a second invitation")

    # alice lends her machine as the worker's warning advises: as a member of its own, not with the owner's key
    box = str(tmp_path / "alice" / ".config" / "p2pexec-worker")
    out = people.run("alice", p2pexec, "invite", "alice/friends", "alice-box")
    people.run("alice", p2pexec, "join", out.strip().splitlines()[-1], P2PEXEC_CONFIG=box)
    people.start("alice", worker, "--cluster", "alice/friends", log="alice-worker.log",
                 P2PEXEC_CONFIG=box)
    people.run("alice", p2pexec, "remove", "alice/friends", "bob")
    removed = time.time()

    ran_on_bob_after: list[str] = []

    def settled(line: str) -> bool:
        sent, _, where = line.partition(" ")
        if not sent.replace(".", "").isdigit():
            return False  # the client's log, e.g. the warning that it dropped bob's worker
        if float(sent) >= removed + 10 and where == "bob":
            ran_on_bob_after.append(line)
        return float(sent) >= removed + 10 and where == "alice-box"

    client.until(settled, 90, "a task sent 10 s after the removal to run on alice's worker")
    later = [client.until(lambda line: line[:1].isdigit(), 60, "more results") for _ in range(5)]
    assert not ran_on_bob_after and all(line.endswith(" alice-box") for line in later), (ran_on_bob_after, later)

    # bob's worker, which the board now refuses, says why in one line and stops (it retried forever)
    assert bobs_worker.wait(timeout=60) == 1
    log = (tmp_path / "bob-worker.log").read_text()
    assert "alice removed you from alice/friends" in log and "p2pexec invite alice/friends bob" in log, log[-2000:]
    log = (tmp_path / "alice-worker.log").read_text()
    assert "worker signs as alice-box" in log and "who owns" not in log, log[-2000:]

    # and carol's executor, once she is removed, fails her tasks with the board's refusal (they waited on)
    people.run("alice", p2pexec, "remove", "alice/friends", "carol")
    refused = client.until(lambda line: " error:AuthenticationError" in line, 60, "carol's executor to refuse her tasks")
    assert "alice removed you from alice/friends" in refused and "p2pexec invite alice/friends carol" in refused, refused


def _parent(_: object = None) -> int:
    import os

    return os.getppid()  # the worker daemon that ran this task (LocalCluster workers are unsandboxed)


@pytest.mark.timeout(120)
def test_a_line_removed_from_a_hand_kept_members_file_takes_effect_in_running_executors():
    from p2pexec import LocalCluster

    with LocalCluster(workers=1) as lc:
        owners = lc.add_worker(user=lc.owner)
        friends = lc.workers[0]
        with lc.executor() as ex:
            wait_for = time.monotonic() + 60
            seen = set()
            while seen != {friends.pid, owners.pid} and time.monotonic() < wait_for:
                seen.update(ex.map(_parent, range(8)))
            assert seen == {friends.pid, owners.pid}
            members = Path(lc.members)
            members.write_text("".join(line for line in members.read_text().splitlines(keepends=True)
                                       if not line.startswith(lc.worker_user + " ")))
            removed = time.monotonic()
            while time.monotonic() < removed + 10:  # the leases notice within a heartbeat or two
                ex.submit(_parent).result(timeout=30)
            assert set(ex.map(_parent, range(20))) == {owners.pid}


def _hold(port: int) -> None:
    """Run until killed, holding a connection the test watches (its EOF is the task process dying)."""
    import socket
    import time

    with socket.create_connection(("127.0.0.1", port)):
        time.sleep(120)


@pytest.mark.timeout(120)
def test_a_worker_stops_the_tasks_of_a_member_removed_from_its_members_file():
    import socket

    from p2pexec import LocalCluster

    with LocalCluster(workers=0) as lc, socket.create_server(("127.0.0.1", 0)) as server:
        lc.add_worker(user=lc.owner)  # the owner lends a machine; the friend uses it
        server.settimeout(60)
        with lc.executor(identity=lc.worker_identity, user=lc.worker_user, shutdown_timeout=1) as ex:
            ex.submit(_hold, server.getsockname()[1])
            conn, _ = server.accept()  # the friend's task runs on the owner's worker
            members = Path(lc.members)
            members.write_text("".join(line for line in members.read_text().splitlines(keepends=True)
                                       if not line.startswith(lc.worker_user + " ")))
            conn.settimeout(20)
            assert conn.recv(1) == b""  # its task process was killed: the worker ended the lease
            conn.close()
