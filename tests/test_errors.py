"""The errors a newcomer will hit: each one clear, none a hang or a raw traceback."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import paramiko
import pytest

from p2pexec import (
    AccessDeniedError, AuthenticationError, BoardConnectionError, ConfigurationError, HostKeyError,
    LocalCluster, NoWorkersError, P2PExecError, P2PExecutor,
)
from p2pexec.board.server import BoardServer
from p2pexec.keys import Keyring, generate_identity_file, load_identity

pytestmark = pytest.mark.timeout(60)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_board(cluster):
    with pytest.raises(BoardConnectionError, match=r"cannot reach the board at 127\.0\.0\.1:\d+.*p2pexec board"):
        cluster.executor(board=f"ssh://alice@127.0.0.1:{_closed_port()}")


def test_unknown_host_key_is_refused_with_its_fingerprint(cluster, tmp_path):
    known = tmp_path / "known_hosts"
    with pytest.raises(HostKeyError, match=r"SHA256:.*accept-new"):
        cluster.executor(known_hosts=known)
    assert not known.exists()


def test_accept_new_host_key_remembers_it(cluster, tmp_path):
    known = tmp_path / "known_hosts"
    with cluster.executor(known_hosts=known, accept_new_host_key=True) as ex:
        assert ex.submit(abs, -3).result() == 3
    assert "127.0.0.1" in known.read_text()
    with cluster.executor(known_hosts=known) as ex:  # now known: no flag needed
        assert ex.submit(abs, -4).result() == 4


def test_changed_host_key_is_refused(cluster, tmp_path):
    other = paramiko.Ed25519Key.from_private_key_file(cluster.identity)  # any other ed25519 key
    known = tmp_path / "known_hosts"
    port = cluster.board.rsplit(":", 1)[1]
    known.write_text(f"[127.0.0.1]:{port} {other.get_name()} {other.get_base64()}\n")
    with pytest.raises(HostKeyError, match="intercepting"):
        cluster.executor(known_hosts=known)


def test_rejected_ssh_key(cluster, tmp_path):
    stranger = tmp_path / "stranger"
    generate_identity_file(stranger)
    members = tmp_path / "members"
    members.write_text(Path(cluster.members).read_text()
                       + f"alice {load_identity('alice', stranger).openssh_public}\n")
    with pytest.raises(AuthenticationError, match="rejected user 'alice'.*users file"):
        cluster.executor(identity=stranger, members=members)


def test_member_of_board_but_not_of_cluster_gets_access_denied(tmp_path):
    for name in ("owner", "mallory", "host"):
        generate_identity_file(tmp_path / name)
    keyring = Keyring.parse("".join(f"{n} {load_identity(n, tmp_path / n).openssh_public}\n"
                                    for n in ("owner", "mallory")))
    (tmp_path / "members").write_text(keyring.dumps())
    host_key = paramiko.Ed25519Key.from_private_key_file(str(tmp_path / "host"))
    with BoardServer(host_key=host_key, users=keyring, state_dir=tmp_path / "state") as board:
        board.set_members("owner/c", [])
        known = tmp_path / "known_hosts"
        known.write_text(f"[127.0.0.1]:{board.port} {host_key.get_name()} {host_key.get_base64()}\n")
        with pytest.raises(AccessDeniedError, match=r"access to cluster owner/c.*Ask its owner \(owner\)"):
            P2PExecutor("owner/c", board=f"ssh://mallory@127.0.0.1:{board.port}", identity=tmp_path / "mallory",
                        members=tmp_path / "members", known_hosts=known)


def test_not_joined_says_what_to_do(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("P2PEXEC_CONFIG", str(tmp_path))
    with pytest.raises(ConfigurationError, match=r"not joined cluster .*p2pexec join CODE.*p2pexec invite"):
        P2PExecutor(cluster.cluster, board=cluster.board, identity=cluster.worker_identity, user=cluster.worker_user)
    with pytest.raises(ConfigurationError, match=r"has no members yet: invite one with 'p2pexec invite"):
        P2PExecutor(cluster.cluster, board=cluster.board, identity=cluster.identity)  # the owner herself
    (tmp_path / "clusters" / "alice").mkdir(parents=True)
    (tmp_path / "clusters" / "alice" / "friends.json").write_text("{}")  # joined, under another name
    with pytest.raises(ConfigurationError, match=r"not joined cluster alice/friend \(you joined: alice/friends\)"):
        P2PExecutor("alice/friend", board=cluster.board, identity=cluster.worker_identity, user=cluster.worker_user)


def test_inviting_to_a_misspelt_cluster_names_those_saved_here(cluster, tmp_path, monkeypatch):
    from p2pexec.invites import invite

    monkeypatch.setenv("P2PEXEC_CONFIG", str(tmp_path))
    (tmp_path / "clusters" / "alice").mkdir(parents=True)
    (tmp_path / "clusters" / "alice" / "friends.json").write_text("{}")
    with pytest.raises(P2PExecError, match=r"only alice can invite to alice/frends; you are 'friend'.*No cluster "
                                           r"alice/frends is saved on this machine \(saved here: alice/friends\)"):
        invite("alice/frends", "dave", board=cluster.board, identity=cluster.worker_identity, user=cluster.worker_user)


def test_an_invitation_naming_a_loopback_board_warns_that_friends_elsewhere_cannot_use_it(tmp_path, monkeypatch,
                                                                                          caplog):
    from p2pexec.invites import invite

    monkeypatch.setenv("P2PEXEC_CONFIG", str(tmp_path))
    with LocalCluster(workers=0) as lc, caplog.at_level(logging.WARNING, logger="p2pexec"):
        code = invite(lc.cluster, "dave", board=lc.board, identity=lc.identity, known_hosts=lc.known_hosts)
    assert code.startswith("p2pexec1:")
    assert any("which only this machine reaches" in r.getMessage() and "--board ssh://alice@HOST:" in r.getMessage()
               for r in caplog.records), caplog.text


def test_identity_missing_or_not_listed(cluster, tmp_path):
    with pytest.raises(ConfigurationError, match="cannot read identity key.*ssh-keygen"):
        cluster.executor(identity=tmp_path / "nope")
    generate_identity_file(tmp_path / "other")
    with pytest.raises(ConfigurationError, match="does not list user 'alice'"):
        cluster.executor(identity=tmp_path / "other")


def test_bad_cluster_name():
    with pytest.raises(ConfigurationError, match="owner/name"):
        P2PExecutor("friends")
    with pytest.raises(TypeError, match=r"not 4 .*max_workers=4"):  # ProcessPoolExecutor(4), swapped in
        P2PExecutor(4)


@pytest.mark.parametrize("option", [{"worker_timeout": 0}, {"worker_timeout": -1}, {"task_timeout": 0},
                                    {"warn_after": -5}, {"lease_idle": 0}, {"max_retries": -1},
                                    {"shutdown_timeout": -1}, {"max_workers": 0}])
def test_nonsense_option_values_are_refused_by_name(option):
    (name,) = option
    with pytest.raises(ValueError, match=name):
        P2PExecutor("alice/friends", **option)


def test_no_worker_warns_with_the_command_and_times_out(caplog):
    with LocalCluster(workers=0) as lc:
        with caplog.at_level(logging.WARNING, logger="p2pexec"):
            with lc.executor(warn_after=0.3, worker_timeout=1.0) as ex:
                future = ex.submit(abs, 1)
                with pytest.raises(NoWorkersError, match="p2pexec-worker --cluster alice/friends --board"):
                    future.result(timeout=30)
    assert any("p2pexec-worker --cluster alice/friends" in r.getMessage() for r in caplog.records)


def test_worker_with_another_python_is_never_used(tmp_path):
    with LocalCluster(workers=0) as lc:
        lc.add_worker(env={"P2PEXEC_ADVERTISE_PYTHON": "2.7"})
        with lc.executor(worker_timeout=2.0) as ex:
            with pytest.raises(NoWorkersError):
                ex.submit(abs, 1).result(timeout=30)
        lc.add_worker()
        with lc.executor() as ex:
            assert ex.submit(abs, -1).result(timeout=30) == 1


@pytest.mark.parametrize("broadcast", [True, False], ids=["broadcast-board", "fan-out-board"])
def test_an_older_worker_is_never_leased_and_named_with_the_fix(caplog, broadcast):
    """Like a release before revisions, this worker reads none: it offers, and the client must refuse.  (On
    ``p2pexec board`` it hears the request only because no worker of the client's revision is there.)"""
    caplog.set_level(logging.DEBUG, logger="p2pexec.client")
    with LocalCluster(workers=0) as lc:
        board = lc.board_server()
        assert board is not None
        board.hub.fan_out = not broadcast
        lc.add_worker(env={"P2PEXEC_ADVERTISE_REVISION": "1"})
        with lc.executor(worker_timeout=2.0) as ex:
            with pytest.raises(NoWorkersError, match=r"friend: runs p2pexec wire revision 1, this client \d+, and "
                                                     r"the two never work together: ask friend to upgrade p2pexec "
                                                     r"there \(pip install -U p2pexec\) and restart the worker"):
                ex.submit(abs, 1).result(timeout=30)
        assert "lease for" not in lc.workers[0].log_path.read_text()
    assert any(r.getMessage().startswith("ignoring an offer from friend: runs p2pexec wire revision 1")
               for r in caplog.records)


def _run_script(cluster, tmp_path: Path, source: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``source`` as a user's script (its own ``__main__``) against the session cluster, configured as a
    user would be: the environment, a members file, known_hosts."""
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(source))
    env = dict(os.environ, P2PEXEC_BOARD=cluster.board, P2PEXEC_IDENTITY=cluster.identity)
    cfg = tmp_path / "cfg"
    (cfg / "clusters" / "alice").mkdir(parents=True)
    (cfg / "clusters" / "alice" / "friends.members").write_text(Path(cluster.members).read_text())
    (tmp_path / "home" / ".ssh").mkdir(parents=True)
    (tmp_path / "home" / ".ssh" / "known_hosts").write_text(Path(cluster.known_hosts).read_text())
    env.update(P2PEXEC_CONFIG=str(cfg), HOME=str(tmp_path / "home"))
    return subprocess.run([sys.executable, str(script), *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)


def test_functions_from_a_script_main_run_on_workers(cluster, tmp_path):
    done = _run_script(cluster, tmp_path, """
        import collections
        from p2pexec import P2PExecutor

        Point = collections.namedtuple("Point", "x y")

        class Scaler:
            def __init__(self, k):
                self.k = k
            def __call__(self, p):
                return Point(p.x * self.k, p.y * self.k)

        def norm2(p):
            return p.x ** 2 + p.y ** 2

        if __name__ == "__main__":
            with P2PExecutor("alice/friends") as ex:
                scaled = list(ex.map(Scaler(3), [Point(1, 2), Point(0, 1)]))
                print(scaled, list(ex.map(norm2, scaled)), ex.submit(lambda: __name__).result())
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[Point(x=3, y=6), Point(x=0, y=3)] [45, 9] __main__"


@pytest.mark.parametrize("results", ["restricted", "trusted"])
def test_classes_of_a_script_main_come_home_as_the_scripts_own(cluster, tmp_path, results):
    """An exception class and a plain class of ``__main__`` travel by value; back home they are the script's
    own classes, with either result unpickling: ``except`` catches, ``isinstance`` holds."""
    done = _run_script(cluster, tmp_path, """
        import sys
        from p2pexec import P2PExecutor, RemoteTraceback

        class MyError(Exception):
            pass

        class Plain:
            def __init__(self, x):
                self.x = x

        def raise_mine(message):
            raise MyError(message)

        def make_plain(x):
            return Plain(x)

        if __name__ == "__main__":
            with P2PExecutor("alice/friends", trusted_results=sys.argv[1] == "trusted") as ex:
                plain = ex.submit(make_plain, 3).result()
                print(type(plain) is Plain, isinstance(plain, Plain), plain.x)
                try:
                    ex.submit(raise_mine, "from a friend").result()
                except MyError as exc:
                    cause = exc.__cause__
                    print(type(exc) is MyError, exc.args, isinstance(cause, RemoteTraceback),
                          "in raise_mine" in str(cause))
    """, results)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["True True 3", "True ('from a friend',) True True"], done.stderr


def test_a_worker_refused_by_the_board_says_so_in_one_line(cluster):
    """The friend whose owner never let them in gets one line with what to do, not a stack of task groups."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "p2pexec.worker_cli", "--cluster", "alice/elsewhere",
         "--board", f"ssh://{cluster.worker_user}@127.0.0.1:{cluster.board.rpartition(':')[2]}",
         "--identity", cluster.worker_identity, "--members", cluster.members, "--known-hosts", cluster.known_hosts,
         "--listen", "/ip4/127.0.0.1/tcp/0", "--no-sandbox"], capture_output=True, text=True, timeout=60)
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert len(errors) == 1 and "p2pexec invite alice/elsewhere" in errors[0], done.stderr
