"""LocalCluster: an embedded board and real worker processes on loopback.

For the quick start, demos and tests: everything is real (SSH board,
worker daemons, libp2p, encryption); only the network is 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import paramiko

from . import portability
from .board.server import BoardServer
from .errors import P2PExecError
from .executor import P2PExecutor
from .keys import Keyring, generate_identity_file, load_identity

log = logging.getLogger("p2pexec.local")

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0  # a stopping worker with nothing running exits in well under a second
_PREFIX = "p2pexec-local-"
# Every worker of a LocalCluster is the same user, each with a board session (plus its commands):
# a public board's 32 per user would cap a local cluster at about 30 workers.
LOCAL_SESSIONS_PER_USER = 1024
_OWNER_FILE = "owner.pid"  # the pid of the process whose cluster it is
WORKER_PROGRAM = (sys.executable, "-m", "p2pexec.worker_cli")
STARTING_AT_ONCE = 2 * (os.cpu_count() or 1)  # workers started together: importing is CPU work, joining waits


def _alive(pid: int) -> bool:
    """Is process ``pid`` running (a zombie is not)?  Where unsure, yes: keys are removed only when sure."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _pid_namespace() -> str:
    """Which PID namespace, on which boot, this process's pids belong to."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{os.readlink('/proc/self/ns/pid')}@{boot}"
    except OSError:
        return "?"


def _remove_stale_directories() -> None:
    """Remove the directories (private keys among them) of LocalClusters whose process is gone.

    A process killed before it closed its cluster, with no worker left to
    clean up after it, leaves one behind.  Without ``/proc`` nothing is
    removed: a pid cannot be tied to its PID namespace and boot there (and
    on Windows ``os.kill(pid, 0)`` would end the process).
    """
    if not portability.procfs():
        return
    for path in Path(tempfile.gettempdir()).glob(_PREFIX + "*"):
        try:
            if path.stat().st_uid != os.getuid():
                continue  # another user's: theirs to remove
            pid, _, where = (path / _OWNER_FILE).read_text().partition(" ")
            owner = int(pid)
        except (OSError, ValueError):
            continue  # being created right now, or not a LocalCluster's
        if where.strip() != _pid_namespace():
            continue  # a process of another PID namespace (a container sharing /tmp): its pid means nothing here
        if not _alive(owner):
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s, left by process %d, which has ended", path, owner)


class PeakMemory:
    """How far this process's resident memory rose inside a ``with`` block (Linux).

    Uses the kernel's own high-water mark, reset on entry: exact, and no
    sampling thread that could miss a short peak.
    """

    growth: int = 0

    def __enter__(self) -> "PeakMemory":
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        self._base = self._kib("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.growth = (self._kib("VmHWM") - self._base) * 1024

    @staticmethod
    def _kib(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"/proc/self/status has no {field}")


class WorkerProcess:
    """A ``p2pexec-worker`` daemon started by a LocalCluster."""

    def __init__(self, popen: subprocess.Popen[bytes], log_path: Path) -> None:
        self.popen = popen
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def kill(self) -> None:
        """SIGKILL, as when a machine vanishes."""
        self.popen.kill()
        self.popen.wait()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, as Ctrl-C would: running tasks finish (for up to ``timeout`` s), then SIGKILL."""
        self.terminate()
        self.wait_or_kill(time.monotonic() + timeout)

    def terminate(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)

    def wait_or_kill(self, deadline: float) -> None:
        try:
            self.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()

    def __repr__(self) -> str:
        return f"<WorkerProcess pid={self.pid} returncode={self.popen.returncode}>"


def _start_failed(worker: WorkerProcess) -> NoReturn:
    worker.stop()
    raise P2PExecError(f"a local worker failed to start; its log:\n{worker.log_path.read_text()[-3000:]}")


class LocalCluster:
    """``with LocalCluster(workers=2) as lc: with lc.executor() as ex: ...``"""

    def __init__(self, workers: int = 2, slots: int = 1, *, owner: str = "alice", name: str = "friends",
                 worker_user: str = "friend", verify_senders: bool = True,
                 worker_options: tuple[str, ...] = (), sandbox: bool = False, verbose: bool = False) -> None:
        """``verify_senders=False`` makes the embedded board relay any line, as pico.sh does;
        ``worker_options`` are extra ``p2pexec-worker`` flags (e.g. ``("--lease-seconds", "5")``).
        Workers run your own tasks on your own machine, so unlike ``p2pexec-worker`` they are not
        sandboxed unless ``sandbox=True``."""
        self.cluster = f"{owner}/{name}"
        self.owner = owner
        self.worker_user = worker_user
        self.slots = slots
        self.verbose = verbose
        self.verify_senders = verify_senders
        self.worker_options = tuple(worker_options) + (() if sandbox else ("--no-sandbox",))
        self.workers: list[WorkerProcess] = []
        self._others: list[str] = []  # members besides the owner and the worker user (add_member)
        self._n_workers = workers
        self._dir = Path(tempfile.mkdtemp(prefix=_PREFIX))
        (self._dir / _OWNER_FILE).write_text(f"{os.getpid()} {_pid_namespace()}")
        self.identity = str(self._dir / "owner_ed25519")
        self.worker_identity = str(self._dir / "worker_ed25519")
        self.members = str(self._dir / "members")
        self.known_hosts = str(self._dir / "known_hosts")
        self._host_key_path = self._dir / "board_host_key"
        self._state = self._dir / "board_state"
        self._server: BoardServer | None = None
        self._port = 0

    @property
    def board(self) -> str:
        return f"ssh://{self.owner}@127.0.0.1:{self._port}"

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> "LocalCluster":
        """Start the board and the workers; they end with this process, however it ends."""
        _remove_stale_directories()
        try:
            generate_identity_file(Path(self.identity), f"{self.owner}@p2pexec-local")
            generate_identity_file(Path(self.worker_identity), f"{self.worker_user}@p2pexec-local")
            generate_identity_file(self._host_key_path, "p2pexec-local-board")
            keyring = Keyring.parse(
                f"{self.owner} {load_identity(self.owner, self.identity).openssh_public}\n"
                f"{self.worker_user} {load_identity(self.worker_user, self.worker_identity).openssh_public}\n"
            )
            Path(self.members).write_text(keyring.dumps())
            self._keyring = keyring
            self._start_board()
            host_key = paramiko.Ed25519Key.from_private_key_file(str(self._host_key_path))
            Path(self.known_hosts).write_text(
                f"[127.0.0.1]:{self._port} {host_key.get_name()} {host_key.get_base64()}\n")
            self.add_workers(self._n_workers)
        except BaseException:
            self.close()
            raise
        return self

    def _start_board(self) -> None:
        self._server = BoardServer(
            host="127.0.0.1", port=self._port,
            host_key=paramiko.Ed25519Key.from_private_key_file(str(self._host_key_path)),
            users=self._keyring, state_dir=self._state, verify_sender=self.verify_senders,
            sessions_per_user=LOCAL_SESSIONS_PER_USER)
        self._server.start()
        self._port = self._server.port
        self._server.set_members(self.cluster, [self.worker_user, *self._others])

    def restart_board(self) -> None:
        """Stop the board and start it again on the same port, keeping users and clusters."""
        if self._server is not None:
            self._server.stop()
        self._start_board()

    def board_server(self) -> BoardServer | None:
        """The embedded board, for inspection (drop counters, sessions)."""
        return self._server

    def stop_board(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def add_worker(self, slots: int | None = None, env: dict[str, str] | None = None,
                   program: Sequence[str] = WORKER_PROGRAM,
                   user: str | None = None, options: Sequence[str] = ()) -> WorkerProcess:
        """Start one more worker daemon; returns once it has joined the board.

        ``program`` is the command that takes ``p2pexec-worker``'s arguments;
        tests pass a misbehaving double of it (or another environment's
        Python).  ``user`` is the member who runs it: the worker user
        (default) or the owner.  ``options`` are extra flags for this worker
        alone (e.g. ``("--tag", "big", "--memory", "2GiB")``).
        """
        return self.add_workers(1, slots, env, program, user, options)[0]

    def add_workers(self, count: int, slots: int | None = None, env: dict[str, str] | None = None,
                    program: Sequence[str] = WORKER_PROGRAM,
                    user: str | None = None, options: Sequence[str] = ()) -> list[WorkerProcess]:
        """Start ``count`` more worker daemons alike (as :meth:`add_worker`), several at once: each spends
        about 2 s importing py-libp2p.  Returns once all have joined the board."""
        spawned: list[WorkerProcess] = []
        starting: dict[int, WorkerProcess] = {}  # the pipe each writes to once it has joined -> the worker
        try:
            while len(spawned) < count or starting:
                while len(spawned) < count and len(starting) < STARTING_AT_ONCE:
                    worker, ready_fd = self._spawn_worker(slots, env, program, user, options)
                    spawned.append(worker)
                    starting[ready_fd] = worker
                ready, _, _ = select.select(list(starting), [], [], READY_TIMEOUT)
                if not ready:  # none joined in READY_TIMEOUT: say why the first of them did not
                    _start_failed(next(iter(starting.values())))
                for ready_fd in ready:
                    worker = starting.pop(ready_fd)
                    said = os.read(ready_fd, 64)
                    os.close(ready_fd)
                    if not said:  # it exited
                        _start_failed(worker)
        finally:
            for ready_fd in starting:
                os.close(ready_fd)
        return spawned

    def _spawn_worker(self, slots: int | None, env: dict[str, str] | None, program: Sequence[str],
                      user: str | None, options: Sequence[str]) -> tuple[WorkerProcess, int]:
        """Start a worker daemon; returns it and the pipe it writes to once it has joined the board."""
        user = user or self.worker_user
        identity = {self.worker_user: self.worker_identity, self.owner: self.identity}[user]
        log_path = self._dir / f"worker-{len(self.workers)}.log"
        scratch = self._dir / "tmp"  # removed with the cluster, even when a test SIGKILLs the worker
        scratch.mkdir(exist_ok=True)
        read_fd, write_fd = os.pipe()
        cmd = [*program, "--cluster", self.cluster,
               "--board", f"ssh://{user}@127.0.0.1:{self._port}",
               "--identity", identity, "--members", self.members,
               "--known-hosts", self.known_hosts, "--slots", str(slots or self.slots),
               "--listen", "/ip4/127.0.0.1/tcp/0", "--ready-fd", str(write_fd),
               "--exit-with-parent", str(os.getpid()), "--remove-with-parent", str(self._dir),
               "--name", f"local-{len(self.workers)}", *self.worker_options, *options]  # (a later --name wins)
        if self.verbose:
            cmd.append("--verbose")
        try:
            with open(log_path, "wb") as log_file:
                popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                         pass_fds=(write_fd,), start_new_session=True,
                                         env={**os.environ, "TMPDIR": str(scratch),
                                              "XDG_STATE_HOME": str(self._dir / "state"),  # (history goes with us)
                                              **(env or {})})
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)  # (the worker has its own copy)
        worker = WorkerProcess(popen, log_path)
        self.workers.append(worker)
        return worker, read_fd

    def add_member(self, name: str) -> dict[str, Any]:
        """Another member with a key of their own; returns the ``executor()`` arguments that act as them.

        Add members before the workers that must know them: a worker re-reads
        the members file when it changes, but only every few seconds.
        """
        path = self._dir / f"{name}_ed25519"
        generate_identity_file(path, f"{name}@p2pexec-local")
        keyring = Keyring.parse(f"{self._keyring.dumps()}{name} {load_identity(name, str(path)).openssh_public}\n")
        Path(self.members).write_text(keyring.dumps())
        self._keyring = keyring
        self._others.append(name)
        if self._server is not None:
            self._server.set_users(keyring)
            self._server.set_members(self.cluster, [self.worker_user, *self._others])
        return {"board": f"ssh://{name}@127.0.0.1:{self._port}", "identity": str(path)}

    def executor(self, **kwargs: Any) -> P2PExecutor:
        options: dict[str, Any] = dict(board=self.board, identity=self.identity, members=self.members,
                                       known_hosts=self.known_hosts, verbose=self.verbose)
        options.update(kwargs)
        return P2PExecutor(self.cluster, **options)

    def close(self) -> None:
        """Stop the workers (all at once, each bounded), the board, and remove the keys."""
        deadline = time.monotonic() + STOP_TIMEOUT
        for worker in self.workers:
            worker.terminate()
        for worker in self.workers:
            worker.wait_or_kill(deadline)
        self.stop_board()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
