"""Sandboxed task processes (bubblewrap): a member's task cannot reach the friend's files, keys, network or
processes, nothing it starts outlives it, and ordinary tasks do not notice."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from pathlib import Path

import pytest

from p2pexec import LocalCluster, TaskProcessDiedError
from p2pexec.protocol.lease import SILENCE_SECONDS
from p2pexec.worker_cli import main as worker_main
from p2pexec.worker.sandbox import detect

from .conftest import wait_until

pytestmark = pytest.mark.timeout(120)
LAYERS = [pytest.param(layer, marks=pytest.mark.skipif(
    detect(layer=layer).layer != layer, reason=f"no {layer} here: {detect(layer=layer).why_not}"))
    for layer in ("bubblewrap", "landlock")]


def probe(paths: list[str], port: int, write_to: str = "") -> dict:
    """What a hostile task tries: read the friend's secrets, write to its home, connect out, see processes."""
    import os
    import socket

    out: dict = {"read": {}, "home": os.path.expanduser("~")}
    if write_to:
        try:
            with open(os.path.join(write_to, "planted-by-a-task"), "w") as f:
                f.write("x")
            out["wrote"] = "wrote"
        except OSError as exc:
            out["wrote"] = type(exc).__name__
    for path in paths:
        try:
            with open(path, "rb") as f:
                out["read"][path] = len(f.read())
        except OSError as exc:
            out["read"][path] = type(exc).__name__
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        out["connect"] = "connected"
    except OSError as exc:
        out["connect"] = type(exc).__name__
    try:
        out["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    except OSError:
        out["pids"] = []
    out["uid"] = os.getuid()
    return out


# What a friend's shell may hold when they start their worker: none of it is any member's business.
FRIENDS_ENVIRONMENT = {"GITHUB_TOKEN": "ghp_the_friends_own", "AWS_SECRET_ACCESS_KEY": "the-friends-cloud",
                       "SSH_AUTH_SOCK": "/tmp/ssh-agent.sock", "https_proxy": "http://friend:pw@proxy:3128",
                       "LC_ALL": "C.UTF-8"}


@pytest.fixture(scope="module", params=LAYERS)
def sandboxed(request):
    with LocalCluster(workers=0, sandbox=True, worker_options=("--sandbox-layer", request.param)) as lc:
        lc.add_worker(env=FRIENDS_ENVIRONMENT)
        lc.layer = request.param
        yield lc


def _environment() -> dict:
    import os

    return dict(os.environ)


def test_a_task_gets_none_of_the_workers_environment_but_what_python_needs(sandboxed):
    with sandboxed.executor() as ex:
        env = ex.submit(_environment).result(timeout=60)
    assert not set(env) & (set(FRIENDS_ENVIRONMENT) - {"LC_ALL"}), env
    assert env["LC_ALL"] == "C.UTF-8" and env["PATH"] and env["HOME"] == env["TMPDIR"] != os.path.expanduser("~")


@pytest.fixture
def listener():
    server = socket.create_server(("127.0.0.1", 0))
    yield server.getsockname()[1]
    server.close()


@pytest.mark.parametrize("layer, says", [("bubblewrap", "PID namespace"), ("landlock", "Landlock ABI")])
def test_check_sandbox_says_what_is_enforced(capsys, layer, says):
    if detect(layer=layer).layer != layer:
        pytest.skip(f"no {layer} here")
    assert worker_main(["--check-sandbox", "--sandbox-layer", layer]) == 0
    out = capsys.readouterr().out
    assert says in out and ("no network" in out or "no TCP" in out)


def test_a_task_cannot_read_the_friends_keys_and_files_nor_reach_the_network(sandboxed, listener):
    secrets = [sandboxed.worker_identity, sandboxed.members, str(Path("~/.ssh/id_ed25519").expanduser()),
               "/etc/shadow", f"/proc/{sandboxed.workers[0].pid}/environ"]
    home = Path("~").expanduser()
    with sandboxed.executor() as ex:
        seen = ex.submit(probe, secrets, listener, str(home)).result(timeout=60)
    assert all(isinstance(result, str) for result in seen["read"].values()), seen["read"]  # errors, no bytes
    assert not (home / "planted-by-a-task").exists(), seen["wrote"]  # (bubblewrap: it wrote to a throwaway root)
    assert seen["connect"] != "connected"
    assert seen["home"] != os.path.expanduser("~")
    if sandboxed.layer == "bubblewrap":  # (Landlock runs tasks as the worker's user, and hides /proc instead)
        assert sandboxed.workers[0].pid not in seen["pids"] and len(seen["pids"]) < 10  # its own PID namespace
        assert seen["uid"] == 65534


@pytest.mark.parametrize("layer", LAYERS)
def test_network_when_the_friend_allows_it(listener, layer):
    with LocalCluster(workers=1, sandbox=True, worker_options=("--network", "--sandbox-layer", layer)) as lc, \
            lc.executor() as ex:
        assert ex.submit(probe, [], listener).result(timeout=60)["connect"] == "connected"


def _spawn_detached(token: str) -> int:
    """Double fork plus setsid: the classic way to leave a process behind."""
    import os
    import subprocess
    import sys

    if os.fork() == 0:
        os.setsid()
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", token], close_fds=True)
        os._exit(0)
    os.wait()
    return 1


def _die() -> None:
    import os

    os._exit(3)


def _running(token: str) -> bool:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if token.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            pass
    return False


def test_nothing_a_task_starts_outlives_its_task_process(sandboxed):
    token = f"p2pexec-left-behind-{uuid.uuid4().hex}"
    with sandboxed.executor() as ex:
        ex.submit(_spawn_detached, token).result(timeout=60)
        wait_until(lambda: _running(token), what="the detached process to run")
        with pytest.raises(TaskProcessDiedError):
            ex.submit(_die).result(timeout=60)
        wait_until(lambda: not _running(token), what="the detached process to die with its task process")
        assert ex.submit(abs, -3).result(timeout=60) == 3  # the slot carries on


def ordinary_work(data: bytes) -> dict:
    """What honest tasks do: temp files, subprocesses, a process pool, NumPy, files shipped as arguments."""
    import multiprocessing
    import subprocess
    import tempfile

    out: dict = {}
    with tempfile.NamedTemporaryFile("wb", delete=False) as f:
        f.write(data)
    out["file"] = open(f.name, "rb").read() == data
    out["subprocess"] = subprocess.run(["echo", "hi"], capture_output=True, text=True).stdout.strip()
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        out["pool"] = pool.map(abs, [-1, -2])
    try:
        import numpy
    except ImportError:
        out["numpy"] = "absent"
    else:
        out["numpy"] = float(numpy.arange(10).sum())
    return out


def test_ordinary_tasks_do_not_notice(sandboxed):
    with sandboxed.executor() as ex:
        out = ex.submit(ordinary_work, os.urandom(100_000)).result(timeout=60)
    assert out["file"] and out["subprocess"] == "hi" and out["pool"] == [1, 2]
    assert out["numpy"] in (45.0, "absent")


def _nap(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


def test_a_task_outlives_the_thread_its_sandbox_was_started_from(sandboxed, caplog):
    """bubblewrap's --die-with-parent fires when the *thread* that started it ends: trio retires its helper
    threads after 10 s idle, which killed every sandboxed task process 10 s after it started.

    The task also outlasts SILENCE_SECONDS: only the heartbeats, both ways, keep its lease."""
    if sandboxed.layer != "bubblewrap":
        pytest.skip("only bubblewrap ties its sandbox to a thread (12 s saved)")
    caplog.set_level(logging.INFO, logger="p2pexec")
    with sandboxed.executor() as ex:
        assert ex.submit(_nap, SILENCE_SECONDS + 2.5).result(timeout=60) == SILENCE_SECONDS + 2.5
        assert ex.submit(_nap, 0).result(timeout=60) == 0  # the same task process, still there
    leased = [r.getMessage() for r in caplog.records if r.getMessage().startswith("leased ")]
    # (p2pexec's own warnings: the embedded board's paramiko may log a reset of an earlier test's connection)
    lost = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("p2pexec")]
    assert len(leased) == 1 and not lost, (leased, lost)


def _allocate(n: int) -> int:
    return len(bytearray(n))


def test_memory_over_the_cap_fails_that_task_and_the_worker_carries_on(sandboxed):
    with LocalCluster(workers=1, sandbox=True,
                      worker_options=("--memory", "1GiB", "--sandbox-layer", sandboxed.layer)) as lc, \
            lc.executor() as ex:
        with pytest.raises(MemoryError):
            ex.submit(_allocate, 2 << 30).result(timeout=60)
        assert ex.submit(_allocate, 16 << 20).result(timeout=60) == 16 << 20


def _connect_unix(path: str) -> str:
    import socket

    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)  # (the test's server never answers: a connection fails the test, not hangs it)
            sock.connect(path)
            return sock.recv(16).decode()
    except OSError as exc:
        return type(exc).__name__


def test_a_task_cannot_reach_a_unix_socket_of_the_machine_by_its_path(sandboxed, tmp_path):
    """An ssh-agent's socket, /var/run/docker.sock: Landlock has no rule for them (seccomp stops them there)."""
    path = str(tmp_path / "agent.sock")
    with socket.socket(socket.AF_UNIX) as server, sandboxed.executor() as ex:
        server.bind(path)
        server.listen()
        server.settimeout(0.1)
        result = ex.submit(_connect_unix, path).result(timeout=60)
        with pytest.raises(TimeoutError):
            server.accept()  # nobody came
    assert result == {"bubblewrap": "FileNotFoundError", "landlock": "PermissionError"}[sandboxed.layer], result
    with sandboxed.executor() as ex:  # what multiprocessing and asyncio use still works
        assert ex.submit(_socketpair_works).result(timeout=60)


def _socketpair_works() -> bool:
    import socket

    a, b = socket.socketpair()
    with a, b:
        a.send(b"x")
        return b.recv(1) == b"x"


def _listen() -> object:
    """Open a listening TCP port and keep it open for as long as the task process lives."""
    import socket

    try:
        server = socket.create_server(("127.0.0.1", 0))
    except OSError as exc:
        return type(exc).__name__
    globals()["_kept"] = server
    return server.getsockname()[1]


def test_a_port_a_task_listens_on_is_not_reachable_from_the_machine(sandboxed):
    with sandboxed.executor() as ex:
        port = ex.submit(_listen).result(timeout=60)
        if isinstance(port, int):  # bubblewrap: its own network namespace, with its own loopback
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
        else:  # Landlock: binding is denied
            assert port == "PermissionError"


def _fork_bomb(most: int) -> int:
    """Start up to ``most`` processes at once (each waits for a pipe to close); how many could start."""
    import os

    read, write = os.pipe()
    children = []
    try:
        for _ in range(most):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                os.close(write)
                os.read(read, 1)
                os._exit(0)
            children.append(pid)
    finally:
        os.close(write)
        for pid in children:
            os.waitpid(pid, 0)
    return len(children)


def test_a_fork_bomb_stops_at_the_process_cap():
    if detect(processes=400).processes != 400:
        pytest.skip(f"no PID cap here: {detect(processes=400).processes_why_not}")
    with LocalCluster(workers=1, sandbox=True,
                      worker_options=("--sandbox-layer", "bubblewrap", "--max-processes", "400")) as lc, \
            lc.executor() as ex:
        started = ex.submit(_fork_bomb, 1000).result(timeout=60)
        assert 400 <= started < 700  # 400, up to 300 more before PIDs wrap; the task process holds a few
        assert ex.submit(_fork_bomb, 300).result(timeout=60) == 300  # after the wrap too, and the slot carries on


def _powers() -> dict:
    """What a task could do to the machine beyond files: capabilities (asked of the kernel), sysctls."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
    assert libc.capget(header, data) == 0
    out: dict = {"CapEff": data[0] | data[3] << 32, "CapPrm": data[1] | data[4] << 32,
                 "CapInh": data[2] | data[5] << 32,
                 "CapBnd": sum(1 << cap for cap in range(41) if libc.prctl(23, cap, 0, 0, 0) == 1),
                 "CapAmb": sum(1 << cap for cap in range(41) if libc.prctl(47, 1, cap, 0, 0) == 1)}
    try:
        with open("/proc/sys/vm/swappiness") as f:
            value = f.read()
        with open("/proc/sys/vm/swappiness", "w") as f:  # the value it already has: harmless if this succeeds
            f.write(value)
        out["sysctl"] = "wrote"
    except OSError as exc:
        out["sysctl"] = type(exc).__name__
    return out


def test_a_task_has_no_capabilities_and_cannot_change_sysctls(sandboxed):
    with sandboxed.executor() as ex:
        powers = ex.submit(_powers).result(timeout=60)
    assert powers["sysctl"] != "wrote"
    assert powers["CapEff"] == powers["CapPrm"] == powers["CapAmb"] == powers["CapInh"] == 0, powers
    if os.geteuid() == 0:  # (only root can empty its bounding set: an ordinary user has nothing to drop)
        assert powers["CapBnd"] == 0, powers


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.isdir("/etc/ssl/private"), reason="needs root and /etc/ssl")
def test_a_root_workers_private_tls_keys_stay_hidden(sandboxed):
    secret = Path("/etc/ssl/private") / f"p2pexec-test-{uuid.uuid4().hex}.key"
    secret.write_bytes(b"private")
    secret.chmod(0o600)
    try:
        with sandboxed.executor() as ex:
            seen = ex.submit(probe, [str(secret)], 1).result(timeout=60)
    finally:
        secret.unlink()
    assert isinstance(seen["read"][str(secret)], str), seen["read"]
