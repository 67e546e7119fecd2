"""Leaving is always prompt: one Ctrl-C ends a program, shutdown does not wait for workers that never
come, LocalCluster workers and keys do not outlive their process, and a stopping worker drains.

The client-side scenarios run a real program as a subprocess and interrupt it at a moment it announces
(a line on its stdout, or its task connecting to a socket the test holds).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from p2pexec import LocalCluster, NoWorkersError, P2PExecError, portability

from .conftest import wait_until

pytestmark = pytest.mark.timeout(120)

# Seconds a program may take to end after one Ctrl-C: it takes 1-2 s (the workers' confirmation, the
# interpreter's exit), 4 s on a loaded machine; a hang would wait out a lease (30 s) or shutdown_timeout (60 s).
PROMPT = 10.0

PRELUDE = '''
import logging, sys
from p2pexec import LocalCluster, P2PExecutor

def hold(port):
    """Tell the test we run (a connection), then wait until the test answers or we are stopped."""
    import socket
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.settimeout(300)
        return conn.recv(1).decode()

class SayWhenLeaving(logging.Handler):
    """Print 'leaving' once shutdown() has begun to wait: the moment the test interrupts."""
    def emit(self, record):
        if record.getMessage().startswith("shutting down"):
            print("leaving", flush=True)

logging.getLogger("p2pexec.client").setLevel(logging.DEBUG)
logging.getLogger("p2pexec.client").addHandler(SayWhenLeaving())

def executor():
    return P2PExecutor("alice/friends", board=sys.argv[1], identity=sys.argv[2], members=sys.argv[3],
                       known_hosts=sys.argv[4])

PORT = int(sys.argv[5])
'''

IN_RESULT = '''
with executor() as ex:
    future = ex.submit(hold, PORT)
    print("waiting", flush=True)
    future.result()
'''

IN_MAP = '''
with executor() as ex:
    results = ex.map(hold, [PORT] * 4)
    print("waiting", flush=True)
    for r in results:
        print(r, flush=True)
'''

IN_RESULT_WITHOUT_WITH = '''
ex = executor()
future = ex.submit(hold, PORT)
behind = ex.submit(hold, PORT)  # queued here: the only slot is busy
print("waiting", flush=True)
future.result()
'''

AT_EXIT = '''
ex = executor()
ex.submit(hold, PORT)
# the end of the program: the interpreter's exit hook waits for the task
'''

WITH_EXIT_NO_WORKER = '''
try:
    with executor() as ex:
        ex.submit(abs, -1)
except KeyboardInterrupt:
    print("interrupted", flush=True)  # caught: the program carries on, and must not wait at its exit
'''


def start_client(tmp_path: Path, lc: LocalCluster, body: str, port: int) -> subprocess.Popen[str]:
    script = tmp_path / "client.py"
    script.write_text(PRELUDE + body)
    return subprocess.Popen([sys.executable, str(script), lc.board, lc.identity, lc.members, lc.known_hosts,
                             str(port)], stdout=subprocess.PIPE, text=True)


def interrupt(proc: subprocess.Popen[str]) -> float:
    """One SIGINT, as Ctrl-C sends; returns how long the program took to end."""
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("the program still ran 30 s after one Ctrl-C") from None
    return time.monotonic() - started


@pytest.fixture
def one_worker():
    """One worker with one slot, and a listener that running tasks connect to."""
    with LocalCluster(workers=1, slots=1) as lc, socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(60)
        yield lc, listener


def log_of(worker) -> str:
    return worker.log_path.read_text()


@pytest.mark.parametrize("body", [IN_RESULT, IN_MAP, IN_RESULT_WITHOUT_WITH], ids=["result", "map", "no-with"])
def test_one_ctrl_c_while_a_task_runs_ends_the_program_and_stops_the_task(tmp_path, one_worker, body):
    lc, listener = one_worker
    proc = start_client(tmp_path, lc, body, listener.getsockname()[1])
    task, _ = listener.accept()  # the task runs on the worker
    with task:
        assert proc.stdout.readline() == "waiting\n"
        assert interrupt(proc) < PROMPT
        task.settimeout(30)
        assert task.recv(1) == b""  # its task process is gone
    wait_until(lambda: "interrupted as asked" in log_of(lc.workers[0]), what="the worker to stop the task as asked")
    assert lc.workers[0].popen.poll() is None  # and it serves on
    with lc.executor() as ex:
        assert ex.submit(abs, -4).result(timeout=60) == 4
    assert connections_since(listener) == 0  # the map's other items were cancelled, never run


def connections_since(listener: socket.socket) -> int:
    """Tasks that connected after the first: they ran although they should have been cancelled."""
    listener.setblocking(False)
    count = 0
    try:
        while True:
            conn, _ = listener.accept()
            conn.close()
            count += 1
    except BlockingIOError:
        return count
    finally:
        listener.settimeout(60)


def test_one_ctrl_c_in_the_exit_hook_ends_the_program(tmp_path, one_worker):
    lc, listener = one_worker
    proc = start_client(tmp_path, lc, AT_EXIT, listener.getsockname()[1])
    task, _ = listener.accept()
    with task:
        assert proc.stdout.readline() == "leaving\n"  # the program ended; its exit hook waits for the task
        assert interrupt(proc) < PROMPT
    wait_until(lambda: "interrupted as asked" in log_of(lc.workers[0]), what="the worker to stop the task as asked")


def test_one_ctrl_c_leaving_with_and_no_worker_ends_the_program(tmp_path):
    with LocalCluster(workers=0) as lc:
        proc = start_client(tmp_path, lc, WITH_EXIT_NO_WORKER, 0)
        assert proc.stdout.readline() == "leaving\n"  # in shutdown(wait=True), which waits for a worker
        assert interrupt(proc) < PROMPT
        assert proc.stdout.read() == "interrupted\n"
        assert proc.returncode == 0


def test_shutdown_with_no_worker_fails_the_futures_naming_the_command_to_run(caplog):
    caplog.set_level(logging.WARNING, logger="p2pexec.client")
    with LocalCluster(workers=0) as lc:
        started = time.monotonic()
        with lc.executor(shutdown_timeout=1.0) as ex:
            futures = [ex.submit(abs, -i) for i in range(3)]
        assert time.monotonic() - started < 20
    for future in futures:
        with pytest.raises(NoWorkersError) as failed:
            future.result(timeout=0)
        message = str(failed.value)
        assert "no worker of cluster alice/friends" in message
        assert f"p2pexec-worker --cluster alice/friends --board {lc.board.replace('alice@', '')}" in message  # not our name
        assert "shutdown_timeout" in message
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("shutdown: no worker of cluster alice/friends took the 3 remaining task(s)" in w for w in warnings)


def test_shutdown_waits_while_workers_lease(one_worker):
    lc, listener = one_worker
    ex = lc.executor(shutdown_timeout=0.5)
    running = ex.submit(hold, listener.getsockname()[1])
    waiting = ex.submit(abs, -5)  # behind it, in the client's queue: the only slot is busy
    task, _ = listener.accept()
    with task:
        left = threading.Event()
        leaving = threading.Thread(target=lambda: (ex.shutdown(wait=True), left.set()))
        leaving.start()
        assert not left.wait(2.0)  # four times shutdown_timeout: still waiting, a worker runs the work
        task.sendall(b"x")
        assert running.result(timeout=30) == "x"
        assert waiting.result(timeout=30) == 5
        leaving.join(30)
        assert left.is_set()


def hold(port):
    """Tell the test we run (a connection), then wait until the test answers or we are stopped."""
    import socket

    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.settimeout(300)
        return conn.recv(1).decode()


def whose():
    """Which worker daemon ran this: a task process's parent."""
    import os

    return os.getppid()


# -- LocalCluster's workers and keys end with its process ---------------------------------------------------

OWNER = '''
import json, socket, sys, threading
from pathlib import Path
from p2pexec import LocalCluster

def hold(port):
    import socket
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.settimeout(300)
        return conn.recv(1)

lc = LocalCluster(workers=2).start()
ex = lc.executor()
ex.submit(hold, int(sys.argv[1]))
print(json.dumps({"dir": str(Path(lc.identity).parent), "workers": [w.pid for w in lc.workers]}), flush=True)
threading.Event().wait()
'''


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent that may never reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_local_cluster_workers_and_keys_end_with_their_process(tmp_path, how):
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(60)
        proc = subprocess.Popen([sys.executable, str(script), str(listener.getsockname()[1])],
                                stdout=subprocess.PIPE, text=True)
        try:
            task, _ = listener.accept()  # a task runs on one of its workers
            started = json.loads(proc.stdout.readline())
            directory, workers = Path(started["dir"]), started["workers"]
            assert (directory / "owner_ed25519").exists() and all(alive(pid) for pid in workers)
            proc.send_signal(how)  # SIGTERM's default action, like SIGKILL, runs no Python cleanup
            proc.wait(30)
            with task:
                task.settimeout(30)
                assert task.recv(1) == b""  # the task process went with its worker
            wait_until(lambda: not any(alive(pid) for pid in workers), timeout=30, what="the workers to end")
            wait_until(lambda: not directory.exists(), timeout=30, what="the keys' directory to go")
        finally:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(not portability.procfs(), reason="the sweep ties pids to their PID namespace through /proc")
def test_a_later_local_cluster_removes_directories_left_by_ended_processes():
    from p2pexec.local import _pid_namespace

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    here = _pid_namespace()
    stale = Path(tempfile.mkdtemp(prefix="p2pexec-local-"))
    (stale / "owner.pid").write_text(f"{ended.pid} {here}")
    (stale / "owner_ed25519").write_text("a private key")
    live = Path(tempfile.mkdtemp(prefix="p2pexec-local-"))
    (live / "owner.pid").write_text(f"{os.getpid()} {here}")
    elsewhere = Path(tempfile.mkdtemp(prefix="p2pexec-local-"))  # a container's, sharing /tmp: its pid is not ours
    (elsewhere / "owner.pid").write_text(f"{ended.pid} pid:[1]@another-boot")
    try:
        with LocalCluster(workers=0):
            pass
        assert not stale.exists()
        assert live.exists()  # its process (this one) still runs
        assert elsewhere.exists()
    finally:
        for path in (stale, live, elsewhere):
            shutil.rmtree(path, ignore_errors=True)


# -- a stopping worker drains ----------------------------------------------------------------------------------


def test_stopping_worker_finishes_its_running_task_and_hands_back_the_rest(one_worker):
    lc, listener = one_worker
    first = lc.workers[0]
    with lc.executor() as ex:
        assert list(ex.map(abs, range(-40, 0))) == list(range(40, 0, -1))  # short tasks: it queues some now
        running = ex.submit(hold, listener.getsockname()[1])
        queued = [ex.submit(whose) for _ in range(4)]  # sent along, queued at the worker behind the running one
        task, _ = listener.accept()
        with task:
            first.popen.send_signal(signal.SIGTERM)
            wait_until(lambda: "draining: 1 task(s) running, Ctrl-C again to stop now" in log_of(first),
                       what="the worker to say it drains")
            second = lc.add_worker()
            assert [f.result(timeout=60) for f in queued] == [second.pid] * 4  # handed back, run elsewhere
            assert first.popen.poll() is None  # still finishing its running task
            task.sendall(b"x")
            assert running.result(timeout=30) == "x"
        assert first.popen.wait(timeout=30) == 0
    assert "drained: every task was answered; stopping" in log_of(first)


def test_a_second_signal_stops_a_draining_worker_at_once(one_worker):
    lc, listener = one_worker
    first = lc.workers[0]
    with lc.executor() as ex:
        running = ex.submit(hold, listener.getsockname()[1])
        task, _ = listener.accept()
        with task:
            first.popen.send_signal(signal.SIGTERM)
            wait_until(lambda: "draining: 1 task(s) running" in log_of(first), what="the worker to say it drains")
            started = time.monotonic()
            first.popen.send_signal(signal.SIGINT)
            first.popen.wait(timeout=30)
            assert time.monotonic() - started < PROMPT
            task.settimeout(30)
            assert task.recv(1) == b""  # its task process was killed
        assert "stopping now: killing 1 running task(s)" in log_of(first)
        lc.add_worker()
        again, _ = listener.accept()  # the client runs the task elsewhere
        with again:
            again.sendall(b"y")
            assert running.result(timeout=60) == "y"


def _raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


def test_a_keyboard_interrupt_raised_by_a_task_is_its_exception_not_a_ctrl_c(one_worker):
    """Leaving ``with`` on it waits for the rest, as ProcessPoolExecutor does; only a Ctrl-C here cancels."""
    lc, _ = one_worker
    with pytest.raises(KeyboardInterrupt) as raised:
        with lc.executor() as ex:
            failing = ex.submit(_raise_keyboard_interrupt)
            behind = [ex.submit(time.sleep, 0.2) for _ in range(3)]  # queued behind it: the only slot is busy
            failing.result()
    assert type(raised.value.__cause__).__name__ == "RemoteTraceback"
    assert [future.result(timeout=0) for future in behind] == [None] * 3


def test_workers_started_together_all_join_and_one_that_cannot_start_is_named_with_its_log():
    """add_workers starts several at once (each imports py-libp2p for about 2 s) and returns once all joined
    the board; one that exits instead fails it with its log."""
    with LocalCluster(workers=0) as lc:
        started = lc.add_workers(3)
        assert started == lc.workers and all(worker.popen.poll() is None for worker in started)
        with lc.executor() as ex:
            assert ex.submit(pow, 2, 5).result(timeout=60) == 32
        broken = [sys.executable, "-c", "import sys; print('no libp2p here'); sys.exit(3)"]
        with pytest.raises(P2PExecError, match="failed to start(.|\n)*no libp2p here"):
            lc.add_workers(2, program=broken)
