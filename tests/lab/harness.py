"""A NAT lab for p2pexec tests: network namespaces, real processes, no sleeps.

``NatLab`` builds the topology of ``natlab.sh`` (two hosts behind NATs, two
public hosts, a public segment) under a prefix unique to this process, runs
processes inside it and always takes it down again. ``LabCluster`` puts a real
``p2pexec board`` on the public segment and starts workers and clients in any
namespace, so tests exercise what friends on home networks would see.

Traffic never leaves the namespaces the lab creates (plus loopback): the lab
has no link to the host's own network.

    with NatLab() as lab, LabCluster(lab) as lc:
        lc.start_worker("w")
        out = lc.run_client("k", tasks=8)
"""

from __future__ import annotations

import atexit
import collections
import functools
import itertools
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import paramiko

from p2pexec.keys import Keyring, generate_identity_file, load_identity

HERE = Path(__file__).resolve().parent
NATLAB_SH = HERE / "natlab.sh"
CLIENT_JOB = HERE / "client_job.py"

#: The namespaces natlab.sh creates, without the prefix.
NAMESPACES = ("pub", "nat1", "nat2", "b", "c", "w", "k")
#: Each host's address as natlab.sh configures it. ``nat1``/``nat2`` are the NATs' public sides.
ADDRESSES = {"pub": "198.51.100.254", "nat1": "198.51.100.1", "nat2": "203.0.113.1",
             "b": "10.0.1.2", "c": "10.0.2.2", "w": "192.0.2.2", "k": "198.18.0.2"}
BOARD_IP = ADDRESSES["pub"]
BOARD_PORT = 2222

#: ``python -c`` programs: the console scripts may not be on PATH inside ``ip netns exec``,
#: and p2pexec has no ``__main__`` module.
P2PEXEC_MAIN = "import sys; from p2pexec.cli import main; sys.exit(main())"
WORKER_MAIN = "import sys; from p2pexec.worker_cli import main; sys.exit(main())"

STOP_GRACE = 5.0          # SIGTERM, then this long, then SIGKILL
COMMAND_TIMEOUT = 30.0    # ip / natlab.sh commands
BOARD_READY_TIMEOUT = 30.0
WORKER_READY_TIMEOUT = 60.0

_counter = itertools.count()
_PREFIX_RE = re.compile(r"^pl(\d+)(?:n\d+_(?:" + "|".join(NAMESPACES) + r")|probe)$")


# -- availability ---------------------------------------------------------------------------
@functools.cache
def lab_unavailable() -> str | None:
    """Why a lab cannot be built here, or None; tests skip with this reason.

    Probes for real (a namespace with iptables' nat table inside), since a
    container may have the tools but not the kernel support or privileges.
    """
    if sys.platform != "linux":
        return "the NAT lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the NAT lab needs root (ip netns, iptables)"
    for tool in ("ip", "iptables", "bash"):
        if shutil.which(tool) is None:
            return f"the NAT lab needs {tool!r} on PATH (apt-get install -y iproute2 iptables)"
    probe = f"pl{os.getpid()}probe"
    try:
        add = _command(["ip", "netns", "add", probe])
        if add.returncode != 0:
            return f"`ip netns add` fails here: {add.stderr.strip() or add.returncode}"
        nat = _command(["ip", "netns", "exec", probe, "iptables", "-t", "nat", "-L", "-n"])
        if nat.returncode != 0:
            return f"iptables' nat table is unusable in a namespace: {nat.stderr.strip() or nat.returncode}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot probe network namespaces: {exc}"
    finally:
        try:
            _command(["ip", "netns", "del", probe])
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


def _command(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT,
             env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A short host-side command (ip, natlab.sh), bounded in time."""
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _netns_pids(name: str) -> list[int]:
    """Every process inside namespace ``name`` (ours or strays: task processes, orphans)."""
    try:
        out = _command(["ip", "netns", "pids", name])
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [int(p) for p in out.stdout.split() if p.isdigit()]


def _list_netns() -> list[str]:
    out = _command(["ip", "netns", "list"])
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def _kill_and_wait(pids: Iterable[int], timeout: float = STOP_GRACE) -> None:
    """SIGKILL processes that are not our children and wait for them to go (pidfd, no polling)."""
    fds = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except (ProcessLookupError, OSError):
            continue
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        fds.append(fd)
    deadline = time.monotonic() + timeout
    try:
        for fd in fds:
            select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
    finally:
        for fd in fds:
            os.close(fd)


def reap_stale_labs() -> list[str]:
    """Delete the labs of processes that died without cleaning up (SIGKILL, OOM, power cut).

    A lab's namespaces carry its owner's pid (``pl<pid>n<k>_<ns>``); when that
    pid no longer exists, whatever still runs inside (an orphaned board or
    worker) is killed, the namespaces are deleted, and the lab's temp dir
    removed. Labs of live processes are never touched.
    """
    stale = [name for name in _list_netns()
             if (m := _PREFIX_RE.match(name)) and not _pid_alive(int(m.group(1)))]
    _kill_and_wait([pid for name in stale for pid in _netns_pids(name)])
    for name in stale:
        _command(["ip", "netns", "del", name])
    for path in Path(tempfile.gettempdir()).glob("natlab-pl*"):  # their logs and keys too
        m = re.match(r"natlab-pl(\d+)n\d+-", path.name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
    return stale


# -- emergency teardown -----------------------------------------------------------------------
_live: set["NatLab"] = set()
_live_lock = threading.Lock()
_atexit_registered = False
_saved_sigterm: Any = None


def _down_all() -> None:
    for lab in list(_live):
        lab.down()


def _on_sigterm(signum: int, frame: Any) -> None:
    # Turn SIGTERM into an interrupt so with-blocks and pytest fixtures unwind and take the lab down.
    raise KeyboardInterrupt(f"signal {signum}")


def _register(lab: "NatLab") -> None:
    """Track a live lab: atexit takes it down, and SIGTERM unwinds instead of killing outright."""
    global _atexit_registered, _saved_sigterm
    with _live_lock:
        if not _atexit_registered:
            atexit.register(_down_all)
            _atexit_registered = True
        if not _live and threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                _saved_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
        _live.add(lab)


def _unregister(lab: "NatLab") -> None:
    global _saved_sigterm
    with _live_lock:
        _live.discard(lab)
        if not _live and _saved_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _saved_sigterm)
            _saved_sigterm = None


# -- process output --------------------------------------------------------------------------
class _Output:
    """Copies a process's output to its log file and lets callers wait for a line (no polling)."""

    def __init__(self, stream: Any, log_path: Path) -> None:
        self.lines: list[str] = []
        self.closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, args=(stream, log_path), daemon=True,
                                        name=f"natlab-log-{log_path.name}")
        self._thread.start()

    def _pump(self, stream: Any, log_path: Path) -> None:
        with open(log_path, "ab") as log:
            try:
                for raw in iter(stream.readline, b""):
                    log.write(raw)
                    log.flush()
                    with self._cond:
                        self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                        self._cond.notify_all()
            finally:
                stream.close()
                with self._cond:
                    self.closed = True
                    self._cond.notify_all()

    def wait_for(self, pattern: re.Pattern[str], timeout: float, count: int = 1) -> re.Match[str] | None:
        """The ``count``-th line (since the start) matching ``pattern``; None at EOF or after ``timeout``."""
        deadline = time.monotonic() + timeout
        seen = found = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if (m := pattern.search(line)) and (found := found + 1) == count:
                        return m
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if self.closed or remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


# -- the lab ------------------------------------------------------------------------------------
class RunResult(subprocess.CompletedProcess):  # type: ignore[type-arg]
    """A CompletedProcess that also names its log in the lab."""

    log_name: str = ""


class NatLab:
    """Network namespaces from natlab.sh under a unique prefix, and the processes run in them.

    ``down()`` is idempotent and always safe: it stops every spawned process
    (process group SIGTERM, then SIGKILL), kills anything still inside the
    namespaces, deletes them and checks they are gone.
    """

    def __init__(self, random_ports: bool = False, *, prefix: str | None = None) -> None:
        self.random_ports = random_ports
        # The pid in the name lets reap_stale_labs() recognise labs of dead processes.
        self.prefix = prefix or f"pl{os.getpid()}n{next(_counter)}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"natlab-{self.prefix}-"))
        self.logs_dir = self.dir / "logs"
        self.logs_dir.mkdir()
        self._procs: list[subprocess.Popen[bytes]] = []
        self._outputs: dict[int, _Output] = {}
        self._logs: dict[str, Path] = {}
        self._log_of: dict[int, str] = {}
        self._is_up = False
        self.up_seconds: float | None = None

    # lifecycle
    def ns(self, short: str) -> str:
        """The real namespace name of ``short`` (``"b"`` -> ``"pl123n0_b"``)."""
        if short not in NAMESPACES:
            raise ValueError(f"unknown namespace {short!r}; expected one of {', '.join(NAMESPACES)}")
        return f"{self.prefix}_{short}"

    def _natlab_env(self) -> dict[str, str]:
        return {**os.environ, "PREFIX": self.prefix, "RANDOM_PORTS": "1" if self.random_ports else "0"}

    def up(self) -> "NatLab":
        """Build the namespaces; on any failure, what was half built is removed."""
        if self._is_up:
            return self
        reap_stale_labs()
        _register(self)
        self._is_up = True
        start = time.monotonic()
        try:
            out = _command(["bash", str(NATLAB_SH), "up"], env=self._natlab_env())
        except BaseException:
            self.down()
            raise
        if out.returncode != 0:
            self.down()
            raise RuntimeError(f"natlab.sh up failed ({out.returncode}): {out.stderr.strip()}")
        self.up_seconds = time.monotonic() - start
        return self

    def down(self) -> None:
        """Stop every process, empty and delete the namespaces. Safe to call at any time, repeatedly."""
        errors: list[BaseException] = []

        def attempt(step: Any, *args: Any) -> None:
            try:
                step(*args)
            except Exception as exc:  # keep tearing down; report the first failure at the end
                errors.append(exc)

        for proc in reversed(self._procs):
            attempt(self.stop, proc)
        self._procs.clear()
        if self._is_up:
            names = [self.ns(n) for n in NAMESPACES]
            attempt(lambda: _kill_and_wait([pid for name in names for pid in _netns_pids(name)]))
            attempt(_command, ["bash", str(NATLAB_SH), "down"], COMMAND_TIMEOUT, self._natlab_env())

            def verify() -> None:
                for name in set(names) & set(_list_netns()):  # natlab.sh down ignores errors: check
                    _command(["ip", "netns", "del", name])
                if left := set(names) & set(_list_netns()):
                    raise RuntimeError(f"namespaces left behind: {sorted(left)}")

            attempt(verify)
            self._is_up = False
            _unregister(self)
        for output in self._outputs.values():
            output.join(STOP_GRACE)
        if not os.environ.get("NATLAB_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)
        if errors:
            raise errors[0]

    def namespaces_present(self) -> list[str]:
        """This lab's namespaces that exist now (for tests of the teardown itself)."""
        mine = {self.ns(n) for n in NAMESPACES}
        return sorted(mine & set(_list_netns()))

    def __enter__(self) -> "NatLab":
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # processes
    def _argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        if not self._is_up:
            raise RuntimeError("the lab is not up")
        return ["ip", "netns", "exec", self.ns(ns), *map(str, argv)]

    @staticmethod
    def _env(env: Mapping[str, str | None] | None) -> dict[str, str]:
        """``os.environ`` with ``env`` layered on top; a None value removes a variable."""
        merged = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for key, value in (env or {}).items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        return merged

    def _log_path(self, log_name: str) -> Path:
        base, n = log_name, 1
        while log_name in self._logs:
            n += 1
            log_name = f"{base}-{n}"
        path = self.logs_dir / f"{log_name}.log"
        self._logs[log_name] = path
        return path

    def spawn(self, ns: str, argv: Sequence[str], *, env: Mapping[str, str | None] | None = None,
              log_name: str | None = None, pass_fds: Sequence[int] = ()) -> subprocess.Popen[bytes]:
        """Start ``argv`` in namespace ``ns``, in its own session (so its whole group can be stopped).

        stdout and stderr go, line by line, to the log ``log_name`` (default
        ``NS-PROGRAM``); wait for a line with :meth:`wait_for_output`. The
        process is stopped by :meth:`down` if not before.
        """
        log_path = self._log_path(log_name or f"{ns}-{Path(str(argv[0])).name}")
        proc = subprocess.Popen(self._argv(ns, argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True, env=self._env(env),
                                pass_fds=tuple(pass_fds), cwd=self.dir)
        self._procs.append(proc)
        self._outputs[proc.pid] = _Output(proc.stdout, log_path)
        self._log_of[proc.pid] = log_path.stem
        return proc

    def wait_for_output(self, proc: subprocess.Popen[bytes], pattern: str, timeout: float, *,
                        count: int = 1) -> re.Match[str]:
        """The ``count``-th output line of ``proc`` matching ``pattern`` (a regex, searched per line).

        Raises TimeoutError, with the process's log, if it exits or ``timeout`` passes first.
        """
        match = self._outputs[proc.pid].wait_for(re.compile(pattern), timeout, count)
        if match is None:
            name = self.log_of(proc)
            state = f"exited with {proc.poll()}" if proc.poll() is not None else f"no such line after {timeout:g} s"
            raise TimeoutError(f"{name} never printed /{pattern}/ x{count} ({state}); its log:\n{self.log(name)[-4000:]}")
        return match

    def run(self, ns: str, argv: Sequence[str], timeout: float = COMMAND_TIMEOUT, *,
            env: Mapping[str, str | None] | None = None, log_name: str | None = None,
            check: bool = False) -> "RunResult":
        """Run a short command in ``ns``; stdout and stderr apart, both kept in a log too.

        On timeout the whole process group is killed and TimeoutExpired raised.
        The result's ``log_name`` is the log actually used (names are made unique).
        """
        log_path = self._log_path(log_name or f"{ns}-{Path(str(argv[0])).name}")
        full = self._argv(ns, argv)
        proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, env=self._env(env), cwd=self.dir)
        self._procs.append(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc, grace=0)
            try:
                out, err = proc.communicate(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:  # a stray outside the group holds the pipes
                out, err = b"", b"(output lost: the pipes stayed open)"
            log_path.write_bytes(out + err)
            raise subprocess.TimeoutExpired(full, timeout, out, err) from None
        finally:
            if proc.returncode is not None:
                self._procs.remove(proc)
        text_out, text_err = out.decode(errors="replace"), err.decode(errors="replace")
        log_path.write_text(f"{text_out}{text_err}")
        result = RunResult(full, proc.returncode, text_out, text_err)
        result.log_name = log_path.stem
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(full)} exited with {result.returncode}:\n{text_out}{text_err}")
        return result

    def stop(self, proc: subprocess.Popen[bytes], grace: float = STOP_GRACE) -> int | None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds; returns the exit status."""
        if proc.poll() is None:
            self._signal_group(proc, signal.SIGTERM if grace > 0 else signal.SIGKILL)
            try:
                proc.wait(grace if grace > 0 else STOP_GRACE)
            except subprocess.TimeoutExpired:
                self._signal_group(proc, signal.SIGKILL)
                proc.wait(STOP_GRACE)
            # Children it left in its group (task processes) go too; the group id is still ours here.
            self._signal_group(proc, signal.SIGKILL)
        return proc.returncode

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def log(self, name: str) -> str:
        """A log's text so far (a spawned process's output, or a run's stdout+stderr)."""
        path = self._logs.get(name)
        if path is None:
            return f"(no log named {name!r}; logs: {', '.join(sorted(self._logs)) or 'none'})"
        try:
            return path.read_text(errors="replace")
        except FileNotFoundError:
            return "(log removed)"

    def log_of(self, proc: subprocess.Popen[bytes]) -> str:
        """The log name of a process started by :meth:`spawn`."""
        return self._log_of[proc.pid]

    def output(self, proc: subprocess.Popen[bytes]) -> str:
        """Everything ``proc`` printed so far (all of it once it has exited)."""
        if proc.poll() is not None:
            self._outputs[proc.pid].join(STOP_GRACE)
        return self.log(self.log_of(proc))

    def log_names(self) -> list[str]:
        return list(self._logs)

    # small network helpers
    def tcp_listener(self, ns: str, port: int, *, log_name: str | None = None) -> subprocess.Popen[bytes]:
        """A TCP server on 0.0.0.0:``port`` in ``ns`` that prints ``accepted IP:PORT`` per connection.

        Returns once it listens, so a probe right after cannot race it.
        """
        proc = self.spawn(ns, [sys.executable, "-c", _LISTENER, str(port)],
                          log_name=log_name or f"{ns}-listener-{port}")
        self.wait_for_output(proc, r"^listening", timeout=COMMAND_TIMEOUT)
        return proc

    def tcp_probe(self, ns: str, host: str, port: int, timeout: float = 2.0) -> dict[str, Any]:
        """Try one TCP connect from ``ns``: {"ok": bool, "error": str | None, "seconds": float}."""
        out = self.run(ns, [sys.executable, "-c", _PROBE, host, str(port), str(timeout)],
                       timeout=timeout + COMMAND_TIMEOUT, log_name=f"{ns}-probe-{host}-{port}")
        try:
            return json.loads(out.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise RuntimeError(f"probe from {ns} printed no result: {out.stdout}{out.stderr}") from None


_LISTENER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16)
print("listening", flush=True)
while True:
    c, (ip, port) = s.accept()
    print(f"accepted {ip}:{port}", flush=True)
    c.close()
"""

_PROBE = """
import json, socket, sys, time
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
t = time.monotonic()
try:
    socket.create_connection((host, port), timeout=timeout).close()
    err = None
except OSError as exc:
    err = repr(exc)
print(json.dumps({"ok": err is None, "error": err, "seconds": round(time.monotonic() - t, 3)}))
"""


# -- a p2pexec cluster in the lab ------------------------------------------------------------------
class LabCluster:
    """A real ``p2pexec board`` in ``pub`` and keys for an owner and members; workers and clients anywhere.

    Users: ``owner`` (alice, runs clients), ``worker_user`` (friend, runs
    workers) and ``others`` (bob). Everyone is in the board's users file and
    the members file, and the owner grants the others access with
    ``p2pexec host``, as a real owner would.
    """

    def __init__(self, lab: NatLab, *, owner: str = "alice", name: str = "friends", worker_user: str = "friend",
                 others: Sequence[str] = ("bob",), board_ns: str = "pub", board_port: int = BOARD_PORT,
                 board_args: Sequence[str] = ()) -> None:
        self.lab = lab
        self.board_args = tuple(board_args)  # e.g. ("--no-relay",)
        self.owner = owner
        self.cluster = f"{owner}/{name}"
        self.worker_user = worker_user
        self.users = tuple(dict.fromkeys((owner, worker_user, *others)))
        self.board_ns = board_ns
        self.board_ip = ADDRESSES[board_ns]
        self.board_port = board_port
        self.dir = lab.dir / "cluster"
        self.home = self.dir / "home"   # HOME for every lab process: no ~/.ssh or ~/.config of ours leaks in
        self.home.mkdir(parents=True)
        self.members = self.dir / "members"
        self.users_file = self.dir / "users"
        self.known_hosts = self.dir / "known_hosts"
        self.state = self.dir / "board-state"
        self.host_key = self.dir / "board_host_ed25519"
        self._identities = {user: self.dir / f"{user}_ed25519" for user in self.users}
        self.board: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.board_start_seconds: float | None = None

    # setup
    def start(self) -> "LabCluster":
        """Keys, users and members files, board (waits for its 'listening' line), access list."""
        try:
            for user, path in self._identities.items():
                generate_identity_file(path, f"{user}@natlab")
            keyring = Keyring.parse("".join(
                f"{user} {load_identity(user, path).openssh_public}\n" for user, path in self._identities.items()))
            self.users_file.write_text(keyring.dumps())
            self.members.write_text(keyring.dumps())
            # Pre-generating the host key lets known_hosts be written before the board starts.
            generate_identity_file(self.host_key, "natlab board")
            key = paramiko.Ed25519Key.from_private_key_file(str(self.host_key))
            self.known_hosts.write_text(f"[{self.board_ip}]:{self.board_port} {key.get_name()} {key.get_base64()}\n")
            self._start_board()
            self._grant_access()
        except BaseException:
            self.close()
            raise
        return self

    def _start_board(self) -> None:
        start = time.monotonic()
        self.board = self.lab.spawn(
            self.board_ns,
            [sys.executable, "-c", P2PEXEC_MAIN, "board", "--listen", f"0.0.0.0:{self.board_port}",
             "--users", self.users_file, "--state", self.state, "--host-key", self.host_key, *self.board_args],
            env=self.env(), log_name="board")
        # Printed once the SSH server (and, where there is one, its relay) accepts connections.
        self.lab.wait_for_output(self.board, r"^p2pexec board listening on", BOARD_READY_TIMEOUT)
        self.board_start_seconds = time.monotonic() - start

    def _grant_access(self, ns: str = "w") -> None:
        members = ",".join(u for u in self.users if u != self.owner)
        out = self.lab.run(ns, [sys.executable, "-c", P2PEXEC_MAIN, "host", self.cluster, "--users", members,
                                *self.participant_args(self.owner)],
                           timeout=COMMAND_TIMEOUT, env=self.env(), log_name="host-access")
        if out.returncode != 0:
            raise RuntimeError(f"`p2pexec host {self.cluster}` failed ({out.returncode}):\n{out.stdout}{out.stderr}"
                               f"\nboard log:\n{self.lab.log('board')[-3000:]}")

    # what participants need
    def board_url(self, user: str) -> str:
        return f"ssh://{user}@{self.board_ip}:{self.board_port}"

    def identity(self, user: str) -> Path:
        return self._identities[user]

    def participant_args(self, user: str) -> list[str]:
        """``--board --identity --members --known-hosts`` for ``user``."""
        return ["--board", self.board_url(user), "--identity", str(self.identity(user)),
                "--members", str(self.members), "--known-hosts", str(self.known_hosts)]

    def env(self, **extra: str | None) -> dict[str, str | None]:
        """Environment overrides for lab processes: isolated HOME, no P2PEXEC_* from the caller."""
        cleared: dict[str, str | None] = {k: None for k in os.environ if k.startswith("P2PEXEC_")}
        return {**cleared, "HOME": str(self.home), "XDG_DATA_HOME": str(self.home / ".local/share"), **extra}

    # workers and clients
    def start_worker(self, ns: str, *, user: str | None = None, slots: int = 1, extra: Sequence[str] = (),
                     name: str | None = None, ready_timeout: float = WORKER_READY_TIMEOUT,
                     program: Sequence[str] = (sys.executable, "-c", WORKER_MAIN)) -> subprocess.Popen[bytes]:
        """A ``p2pexec-worker`` in ``ns``, listening on its default (0.0.0.0) as a real user's would.

        Returns once it wrote "ready" to its --ready-fd (it has joined the
        board and its relay).  ``program`` takes ``p2pexec-worker``'s arguments
        (tests pass a misbehaving double). Its tasks see ``LAB_WORKER=name`` (default ``NS-N``), so a
        client can tell which worker ran what.
        """
        user = user or self.worker_user
        name = name or f"{ns}-{len(self.workers)}"
        read_fd, write_fd = os.pipe()
        try:
            proc = self.lab.spawn(
                ns, [*program, "--cluster", self.cluster, *self.participant_args(user),
                     "--slots", str(slots), "--ready-fd", str(write_fd),
                     "--no-sandbox",  # its tasks note their runs in the lab's files; sandboxing is tested apart
                     *extra],
                env=self.env(LAB_WORKER=name, LAB_RUNLOG=str(self.runlog(name))), log_name=f"worker-{name}",
                pass_fds=(write_fd,))
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.workers.append(proc)
        try:
            # EOF (the worker exited) wakes this as well as "ready" does.
            readable, _, _ = select.select([read_fd], [], [], ready_timeout)
            ready = bool(readable) and os.read(read_fd, 64).startswith(b"ready")
        finally:
            os.close(read_fd)
        if not ready:
            state = f"exited with {proc.poll()}" if proc.poll() is not None else f"not ready after {ready_timeout:g} s"
            self.lab.stop(proc)
            raise RuntimeError(f"worker {name} in {ns} failed to start ({state}); its log:\n"
                               f"{self.worker_log(proc)[-4000:]}")
        return proc

    def runlog(self, name: str) -> Path:
        """Where the tasks run by worker ``name`` note each run (client_job's ``square``)."""
        return self.dir / f"runs-{name}.log"

    def runs(self, name: str) -> "collections.Counter[int]":
        """How many times worker ``name`` ran each task argument."""
        path = self.runlog(name)
        return collections.Counter(int(line) for line in path.read_text().split()) if path.exists() else \
            collections.Counter()

    def status(self, ns: str, user: str | None = None) -> str:
        """``p2pexec status`` of the cluster, as ``user`` (default: the first other member), from ``ns``."""
        user = user or next(u for u in self.users if u not in (self.owner, self.worker_user))
        out = self.lab.run(ns, [sys.executable, "-c", P2PEXEC_MAIN, "status", self.cluster, "--wait", "1.5",
                                *self.participant_args(user)], env=self.env(), log_name=f"status-{next(_counter)}")
        return out.stdout + out.stderr

    def worker_log(self, proc: subprocess.Popen[bytes]) -> str:
        return self.lab.log(self.lab.log_of(proc))

    def spawn_client(self, ns: str, *, user: str | None = None, tasks: int = 8, timeout: float = 60.0,
                     sleep: float = 0.0, until_upgraded: float = 0.0, extra_kwargs: Mapping[str, Any] | None = None,
                     log_level: str | None = "INFO", log_name: str | None = None) -> subprocess.Popen[bytes]:
        """Start tests/lab/client_job.py in ``ns``: a P2PExecutor, one submit, then map over range(tasks).

        Each task sleeps ``sleep`` seconds; with ``until_upgraded``, short tasks keep a relayed lease busy
        until it moved to a direct connection (at most that many seconds) before the map.  ``worker_timeout`` defaults to
        ``timeout - 5`` so a missing worker is a clean error; ``log_level``
        turns on the client's logging, into its log.  Read the outcome with
        :meth:`client_result`.
        """
        user = user or self.owner
        kwargs = {"worker_timeout": max(1.0, timeout - 5.0), **(extra_kwargs or {})}
        config = {"cluster": self.cluster, "board": self.board_url(user), "identity": str(self.identity(user)),
                  "members": str(self.members), "known_hosts": str(self.known_hosts), "tasks": tasks,
                  "timeout": timeout, "kwargs": kwargs, "log_level": log_level, "sleep": sleep,
                  "until_upgraded": until_upgraded}
        proc = self.lab.spawn(ns, [sys.executable, CLIENT_JOB, json.dumps(config)], env=self.env(),
                              log_name=log_name or f"client-{ns}-{next(_counter)}")
        proc.timeout = timeout  # type: ignore[attr-defined]
        return proc

    def client_result(self, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
        """Wait for a client from :meth:`spawn_client`; its JSON line, or ``{"error": ...}`` with its log.

        ``{"results": [[x*x, worker], ...], "first_result_s", "map_s", ...}``; ``"log"`` is the client's
        output either way.
        """
        timeout = proc.timeout + 15  # type: ignore[attr-defined]
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.lab.stop(proc)
            code = None
        log = self.lab.output(proc)
        result: dict[str, Any] | None = None
        for line in reversed(log.splitlines()):
            try:
                candidate = json.loads(line)
            except ValueError:
                continue
            if isinstance(candidate, dict) and ("results" in candidate or "error" in candidate):
                result = candidate
                break
        if result is None:
            result = {"error": f"client_job printed no JSON result (exit {code})"}
        if code != 0:
            result.setdefault("error", f"client_job exited with {code}")
        result["log"] = log
        return result

    def run_client(self, ns: str, **options: Any) -> dict[str, Any]:
        """:meth:`spawn_client`, then :meth:`client_result`."""
        return self.client_result(self.spawn_client(ns, **options))

    def start_relay(self, ns: str, *, port: int = 4001) -> subprocess.Popen[bytes]:
        """``p2pexec relay OWNER/NAME`` in ``ns``, run by the owner: it announces itself, signed, on the board."""
        proc = self.lab.spawn(ns, [sys.executable, "-c", P2PEXEC_MAIN, "relay", self.cluster,
                                   "--listen", f"0.0.0.0:{port}", *self.participant_args(self.owner)],
                              env=self.env(), log_name=f"relay-{ns}")
        self.lab.wait_for_output(proc, r"^announcing it on", BOARD_READY_TIMEOUT)
        return proc

    def watch_board(self, ns: str = "w") -> subprocess.Popen[bytes]:
        """Every line on the cluster's topic, through the real OpenSSH client (``sub -k``), into a log.

        Returns once subscribed (an ``ls`` through the same key shows it).
        """
        proc = self.lab.spawn(ns, ["ssh", "-F", "/dev/null", "-T", "-p", str(self.board_port),
                                   "-i", str(self.identity(self.owner)), "-o", f"UserKnownHostsFile={self.known_hosts}",
                                   "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
                                   f"{self.owner}@{self.board_ip}", f"sub {self.cluster} -k -c"],
                              env=self.env(), log_name=f"board-lines-{next(_counter)}")
        deadline = time.monotonic() + BOARD_READY_TIMEOUT
        while "Subs:" not in self._ls(ns):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the board watcher did not subscribe:\n{self.lab.output(proc)}")
        return proc

    def _ls(self, ns: str) -> str:
        out = self.lab.run(ns, ["ssh", "-F", "/dev/null", "-T", "-p", str(self.board_port),
                                "-i", str(self.identity(self.owner)), "-o", f"UserKnownHostsFile={self.known_hosts}",
                                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
                                f"{self.owner}@{self.board_ip}", "ls"], env=self.env())
        return out.stdout

    def board_lines(self, watcher: subprocess.Popen[bytes]) -> int:
        """How many lines the watcher saw on the topic so far."""
        return sum(1 for line in self.lab.output(watcher).splitlines() if line.startswith("{"))

    # teardown
    def close(self) -> None:
        """Stop workers, then the board. The lab's down() sweeps up anything else."""
        for proc in reversed(self.workers):
            self.lab.stop(proc)
        if self.board is not None:
            self.lab.stop(self.board)

    def __enter__(self) -> "LabCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data
