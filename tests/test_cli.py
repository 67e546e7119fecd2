"""The command line, run as real processes: p2pexec board / host / status."""

from __future__ import annotations

import json
import platform
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from p2pexec.board.server import SWITCH_SECONDS
from p2pexec.keys import generate_identity_file, load_identity

from .conftest import wait_until

pytestmark = pytest.mark.timeout(90)


def ssh(port: int, key: Path, user: str, *command: str, known_hosts: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-T", "-p", str(port), "-i", str(key), "-o", f"UserKnownHostsFile={known_hosts}",
         "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
         f"{user}@127.0.0.1", *command], capture_output=True, text=True, timeout=30)


@pytest.fixture
def board_process(tmp_path):
    keys = {name: tmp_path / name for name in ("alice", "bob", "mallory")}
    for name, path in keys.items():
        generate_identity_file(path, name)
    users = tmp_path / "users"
    users.write_text("".join(f"{n} {load_identity(n, p).openssh_public} {n}@test\n" for n, p in keys.items()))
    proc = subprocess.Popen([sys.executable, "-m", "p2pexec.cli", "board", "--listen", "127.0.0.1:0",
                             "--users", str(users), "--state", str(tmp_path / "state")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = [proc.stdout.readline() for _ in range(4)]
        port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", banner[0]).group(1))
        fingerprint = re.search(r"host key: ssh-ed25519 (SHA256:\S+)", banner[1]).group(1)
        known = tmp_path / "known_hosts"
        pub = (tmp_path / "state" / "host_ed25519.pub").read_text().split()
        known.write_text(f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
        yield {"proc": proc, "port": port, "keys": keys, "users": users, "known": known, "banner": banner,
               "fingerprint": fingerprint, "dir": tmp_path}
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_board_cli_serves_openssh_and_reloads_users_and_stops_cleanly(board_process):
    b = board_process
    port, keys, known = b["port"], b["keys"], b["known"]
    assert "ssh-keyscan -p" in b["banner"][2]
    assert ssh(port, keys["bob"], "bob", "user", known_hosts=known).stdout == "bob\n"

    host = subprocess.run(["p2pexec", "host", "alice/friends", "--users", "bob",
                           "--board", f"ssh://alice@127.0.0.1:{port}", "--identity", str(keys["alice"]),
                           "--known-hosts", str(known)], capture_output=True, text=True, timeout=30)
    assert host.returncode == 0, host.stderr
    assert "members of alice/friends: bob" in host.stdout
    denied = ssh(port, keys["mallory"], "mallory", "sub", "alice/friends", known_hosts=known)
    assert denied.returncode == 1 and "access denied" in denied.stderr
    assert "alice/friends: (Access List: bob)" in ssh(port, keys["alice"], "alice", "ls", known_hosts=known).stdout

    # bob leaves the users file; SIGHUP makes the board re-read it at once
    b["users"].write_text("".join(line + "\n" for line in b["users"].read_text().splitlines()
                                  if not line.startswith("bob ")))
    b["proc"].send_signal(signal.SIGHUP)
    wait_until(lambda: ssh(port, keys["bob"], "bob", "user", known_hosts=known).returncode == 255,
               what="bob to be refused")
    assert ssh(port, keys["alice"], "alice", "user", known_hosts=known).stdout == "alice\n"

    b["proc"].send_signal(signal.SIGTERM)
    assert b["proc"].wait(15) == 0


def test_host_by_a_non_owner_is_refused_locally(board_process):
    b = board_process
    done = subprocess.run(["p2pexec", "host", "alice/friends", "--users", "bob",
                           "--board", f"ssh://bob@127.0.0.1:{b['port']}", "--identity", str(b["keys"]["bob"]),
                           "--known-hosts", str(b["known"])], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "only the owner 'alice'" in done.stderr and "Traceback" not in done.stderr


def test_board_cli_takes_its_process_for_the_board(tmp_path):
    """``p2pexec board`` sets its own interpreter's switch interval (board.server.dedicate_process): the
    run below reports the interval as the board starts, then is stopped."""
    generate_identity_file(tmp_path / "alice", "alice")
    users = tmp_path / "users"
    users.write_text(f"alice {load_identity('alice', tmp_path / 'alice').openssh_public} alice@test\n")
    run = ("import sys; import p2pexec.board.server as s; dedicate = s.dedicate_process; "
           "s.dedicate_process = lambda: (dedicate(), print('switch interval', sys.getswitchinterval(), flush=True)); "
           "from p2pexec.cli import main; sys.exit(main())")
    proc = subprocess.Popen([sys.executable, "-c", run, "board", "--listen", "127.0.0.1:0", "--users", str(users),
                             "--state", str(tmp_path / "state"), "--no-relay"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert first.startswith("switch interval"), first + proc.stderr.read() if proc.poll() is not None else first
        assert float(first.split()[-1]) == pytest.approx(SWITCH_SECONDS)
        assert "listening on 127.0.0.1:" in proc.stdout.readline()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_board_cli_bad_users_file_is_a_clear_error(tmp_path):
    users = tmp_path / "users"
    users.write_text("alice ssh-rsa AAAA\n")
    done = subprocess.run(["p2pexec", "board", "--listen", "127.0.0.1:0", "--users", str(users),
                           "--state", str(tmp_path / "s")], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "users:1" in done.stderr and "ssh-ed25519" in done.stderr and "Traceback" not in done.stderr


def _slow(x):
    import time

    time.sleep(x)
    return x


def test_status_lists_workers_and_a_busy_client(cluster):
    with cluster.executor(max_workers=1) as ex:
        futures = [ex.submit(_slow, 0.3) for _ in range(8)]
        futures[0].result(timeout=30)
        done = subprocess.run(["p2pexec", "status", cluster.cluster, "--json", "--wait", "1.5",
                               "--board", cluster.board, "--identity", cluster.identity,
                               "--members", cluster.members, "--known-hosts", cluster.known_hosts],
                              capture_output=True, text=True, timeout=60)
        for f in futures:
            f.cancel()
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["cluster"] == "alice/friends"
    assert len(status["workers"]) == 2
    assert all(w["user"] == "friend" and w["slots"] == 1 and w["py"] == f"{sys.version_info[0]}.{sys.version_info[1]}"
               for w in status["workers"])
    clients = [c for c in status["clients"] if c["user"] == "alice"]
    assert len(clients) == 1 and clients[0]["queued"] + clients[0]["running"] >= 1


def test_status_text_output(cluster):
    done = subprocess.run(["p2pexec", "status", cluster.cluster, "--wait", "1", "--board", cluster.board,
                           "--identity", cluster.identity, "--members", cluster.members,
                           "--known-hosts", cluster.known_hosts], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "2 worker(s)" in done.stdout and "friend" in done.stdout
    assert f"{sys.platform}/{platform.machine()}" in done.stdout and " per slot)" in done.stdout
