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


def _spin(seconds: float) -> None:
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:  # (holding the GIL, as a task in C code may)
        pass


def _task_processes(daemon: int) -> dict[int, float]:
    """The task processes a worker daemon started, with the CPU seconds each used."""
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read()
        except (FileNotFoundError, NotADirectoryError, ProcessLookupError):
            continue
        if int(fields[1]) == daemon and b"p2pexec.worker.taskproc" in command:
            found[int(entry)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("layer", [None, "landlock"])
def test_a_task_process_ends_with_its_sigkilled_worker(layer):
    """Left running, it did its task twice over (the client runs it elsewhere) on a machine whose restarted
    worker handed out its slot again."""
    from p2pexec.worker.sandbox import detect

    from .conftest import wait_until

    if layer is not None and detect(layer=layer).layer != layer:
        pytest.skip(f"no {layer} here")
    options = () if layer is None else ("--sandbox-layer", layer)
    with LocalCluster(workers=1, sandbox=layer is not None, worker_options=options) as lc:
        ex = lc.executor()
        busy: list[int] = []
        try:
            ex.submit(_spin, 60)
            wait_until(lambda: busy.extend(pid for pid, cpu in _task_processes(lc.workers[0].pid).items()
                                           if cpu > 0.5) or busy, timeout=60, what="the task to run")
            lc.workers[0].kill()
            wait_until(lambda: not _alive(busy[0]), timeout=10, what="the task process to end with its worker")
        finally:
            ex.shutdown(wait=False, cancel_futures=True)  # (its task has no worker left to run on)
            for pid in busy:
                if _alive(pid):
                    os.kill(pid, 9)


def _start_and_leave(_: object = None) -> int:
    import subprocess

    return subprocess.Popen(["sleep", "120"], start_new_session=True).pid  # not waited for, in a session of its own


def test_what_an_unsandboxed_task_starts_ends_with_its_task_process():
    """LocalCluster (unsandboxed) left them running, reparented to init, after it closed."""
    from p2pexec import portability

    from .conftest import wait_until

    if not portability.procfs():  # (the worker says so: "... and leave processes behind")
        pytest.skip("sweeping needs /proc and a child subreaper (Linux)")
    with LocalCluster(workers=1) as lc, lc.executor() as ex:
        pid = ex.submit(_start_and_leave).result(timeout=60)
        assert _alive(pid)
    try:
        wait_until(lambda: not _alive(pid), timeout=10, what="what the task started to end with the cluster")
    finally:
        if _alive(pid):
            os.kill(pid, 9)


CLIENT = """
import sys
from p2pexec import P2PExecutor

def hold_the_slot(port):
    import socket, time
    conn = socket.create_connection(("127.0.0.1", port))  # tells the test we run; closes when we are killed
    time.sleep(300)
    conn.close()

ex = P2PExecutor("alice/friends", board=sys.argv[1], identity=sys.argv[2], members=sys.argv[3],
                 known_hosts=sys.argv[4])
ex.submit(hold_the_slot, int(sys.argv[5])).result()
"""


def test_worker_stops_the_task_and_frees_the_slot_of_a_client_that_died(tmp_path):
    import socket
    import subprocess
    import sys

    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    with LocalCluster(workers=1) as lc, socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(60)
        port = listener.getsockname()[1]
        client = subprocess.Popen([sys.executable, str(script), lc.board, lc.identity, lc.members,
                                   lc.known_hosts, str(port)])
        try:
            task, _ = listener.accept()  # the task runs on the worker and holds its only slot
        finally:
            client.kill()
            client.wait(10)
        with task:
            task.settimeout(60)
            assert task.recv(1) == b""  # the worker killed the orphaned task's process
        with lc.executor() as ex:  # and freed the slot
            assert ex.submit(abs, -7).result(timeout=60) == 7
        assert lc.workers[0].popen.poll() is None


def connect_and_wait(port):
    import socket

    with socket.create_connection(("127.0.0.1", port)) as conn:  # tells the test where we run
        conn.settimeout(120)
        return conn.recv(16).decode()


def test_frozen_worker_is_given_up_and_its_task_runs_elsewhere():
    """A worker whose machine freezes (lid closed) keeps its TCP connection but says nothing."""
    import signal
    import socket

    with LocalCluster(workers=1) as lc, socket.create_server(("127.0.0.1", 0)) as listener, \
            lc.executor() as ex:
        listener.settimeout(60)
        future = ex.submit(connect_and_wait, listener.getsockname()[1])
        first, _ = listener.accept()
        frozen = lc.workers[0]
        os.killpg(frozen.pid, signal.SIGSTOP)  # the daemon and its task process stop, sockets stay open
        try:
            lc.add_worker()
            second, _ = listener.accept()  # the client gave up on the silent worker and sent the task on
            with first, second:
                second.sendall(b"thawed")
                assert future.result(timeout=60) == "thawed"
        finally:
            os.killpg(frozen.pid, signal.SIGKILL)
            frozen.popen.wait()


def test_worker_frees_the_slot_of_a_frozen_client(tmp_path):
    import signal
    import socket
    import subprocess
    import sys

    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    with LocalCluster(workers=1) as lc, socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(60)
        client = subprocess.Popen([sys.executable, str(script), lc.board, lc.identity, lc.members,
                                   lc.known_hosts, str(listener.getsockname()[1])])
        try:
            task, _ = listener.accept()
            client.send_signal(signal.SIGSTOP)  # alive to the kernel, silent to the worker
            with task:
                task.settimeout(60)
                assert task.recv(1) == b""  # the worker gave up on the client and killed its task
        finally:
            client.kill()
            client.wait(10)
        with lc.executor() as ex:
            assert ex.submit(abs, -8).result(timeout=60) == 8


def test_a_task_lost_more_than_max_retries_times_fails_naming_its_lost_workers():
    import socket

    from p2pexec import WorkerLostError

    with LocalCluster(workers=1) as lc, socket.create_server(("127.0.0.1", 0)) as listener, \
            lc.executor(max_retries=1) as ex:
        listener.settimeout(60)
        future = ex.submit(connect_and_wait, listener.getsockname()[1])
        for _ in range(2):  # lost once: retried; lost twice: more than max_retries
            conn, _ = listener.accept()
            with conn:
                lc.workers[-1].kill()
                lc.add_worker()
        with pytest.raises(WorkerLostError, match=r"lost with its worker 2 times: friend/local-\d at \d\d:\d\d:\d\d"):
            future.result(timeout=60)
        assert ex.submit(abs, -9).result(timeout=60) == 9  # the executor carries on
