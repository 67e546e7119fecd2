"""Task code is kept apart from the worker daemon and from other members' tasks.

The daemon never unpickles task payloads (it does not even load dill); a task
process is never shared between members; what a task process claims cannot
break the daemon.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.timeout(60)


def test_daemon_import_graph_has_no_unpickler():
    code = ("import sys, p2pexec.worker_cli, p2pexec.worker.daemon; "
            "print(sorted(m for m in sys.modules if m == 'dill' or m.startswith('dill.') or m == 'p2pexec.tasks'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_help_is_fast_and_does_not_load_libp2p():
    code = "import sys; from p2pexec.worker_cli import main; print('libp2p' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
    started = time.perf_counter()
    done = subprocess.run(["p2pexec-worker", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--cluster" in done.stdout and "--slots" in done.stdout
    assert time.perf_counter() - started < 30  # loose: only catches a hang, not a timing target


@pytest.mark.parametrize("command", ["p2pexec", "p2pexec-worker"])
def test_version_says_the_wire_revision_friends_must_share(command):
    from p2pexec import __version__
    from p2pexec.protocol.matching import REVISION

    done = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == f"p2pexec {__version__} (wire revision {REVISION})", done.stderr


def test_demo_command_runs_the_full_path():
    done = subprocess.run(["p2pexec", "demo", "--workers", "2", "--tasks", "8"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "[0, 1, 4, 9, 16, 25, 36, 49]" in done.stdout
    assert re.search(r"^workers used: [12] of 2$", done.stdout, re.MULTILINE)
    assert re.search(r"^progress: 8/8 done, [\d.]+ tasks/s$", done.stderr, re.MULTILINE), done.stderr  # not a TTY


def leave_a_mark(tag):
    import builtins

    previous = getattr(builtins, "_p2pexec_test_mark", None)
    builtins._p2pexec_test_mark = tag  # what a hostile task would do: patch its process for later tasks
    return previous


def test_a_task_process_is_never_shared_between_members():
    from p2pexec import LocalCluster

    with LocalCluster(workers=1, slots=1) as lc:
        with lc.executor() as alice:
            assert alice.submit(leave_a_mark, "alice").result(timeout=60) is None
            assert alice.submit(leave_a_mark, "alice again").result(timeout=60) == "alice"  # her own process
        with lc.executor(identity=lc.worker_identity, user=lc.worker_user) as friend:
            assert friend.submit(leave_a_mark, "friend").result(timeout=60) is None  # a fresh process


def _hop_socket():
    """The task process's socket to its worker daemon, found as hostile code could find it."""
    import os
    import socket
    import stat

    for fd in range(3, 256):
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                return socket.socket(fileno=os.dup(fd))
        except OSError:
            pass
    raise RuntimeError("no hop socket")


def forge_an_outcome(how):
    import os
    import socket
    import time

    from p2pexec.worker.hop import HEADER, INLINE, REPORT, SHARED

    hop = _hop_socket()
    if how == "huge":
        hop.sendall(HEADER.pack(INLINE, 0, 1 << 62))  # "here come 4 EiB"
    elif how == "unsealed":  # a memory file it could shrink under the daemon's feet
        fd = os.memfd_create("forged")
        os.ftruncate(fd, 1 << 20)
        socket.send_fds(hop, [HEADER.pack(SHARED, 0, 1 << 20)], [fd])
    elif how == "pipe":
        reader, _ = os.pipe()
        socket.send_fds(hop, [HEADER.pack(SHARED, 0, 1 << 20)], [reader])
    elif how == "fds-inline":
        socket.send_fds(hop, [HEADER.pack(INLINE, 0, 0)], [0, 1, 2])
    elif how == "skip":  # "I skipped task 7, as asked": nobody asked
        notice = b'{"skipped": 7}'
        hop.sendall(HEADER.pack(REPORT, 0, len(notice)) + notice)
    time.sleep(60)


@pytest.mark.parametrize("how, error", [
    ("huge", "does not fit in this worker's memory"),
    ("unsealed", "unusable shared outcome: the shared outcome is not sealed"),
    ("pipe", "unusable shared outcome: the shared outcome is not a memory file"),
    ("fds-inline", "broke the hop protocol"),
    ("skip", "claimed to skip a task it was not asked to"),
])
def test_a_task_process_lying_to_its_daemon_fails_that_task_alone(cluster, how, error):
    from p2pexec import TaskProcessDiedError

    with cluster.executor() as ex:
        with pytest.raises(TaskProcessDiedError, match=error):
            ex.submit(forge_an_outcome, how).result(timeout=60)
        assert list(ex.map(abs, range(-5, 0))) == [5, 4, 3, 2, 1]
    assert all(w.popen.poll() is None for w in cluster.workers)
