"""Where task processes run: a bubblewrap sandbox that shows them only what a task needs.

Layer by layer (what each guarantees); bubblewrap where it works, else
Landlock (``--sandbox-layer`` chooses):

* **bubblewrap** (``bwrap``, Debian package ``bubblewrap``): the task
  process gets its own mount, PID, IPC, UTS and (unless ``--network``)
  network namespaces.  It sees the system directories and this Python
  installation read-only, a private scratch directory (its ``HOME``,
  ``TMPDIR`` and working directory) and an empty ``/tmp``; nothing else of
  the worker's user: not ``$HOME``, ``~/.ssh``, the identity key, the
  members file, nor other processes (its ``/proc`` shows its own PID
  namespace).  It runs as an unprivileged user with no capabilities, even
  when the worker runs as root, and every process it starts dies with it
  (the PID namespace ends when the task process does).  ``/proc/sys`` is
  read-only, and on Linux 6.14+ the PID namespace holds ``processes``
  PIDs (threads included; up to 300 more before PIDs first wrap around):
  a fork bomb stops there.
  Run as root, the sandbox's user is root outside it: a task may read
  root's own private files inside the directories it sees (``/etc/ssl/private``
  is not among them); run workers as an ordinary user.
* **Landlock** (Linux 5.13+, no package; :mod:`.landlock`): the task
  process confines itself before it reads its first task.  It may read the
  system and Python directories and a few files of ``/etc``, write only its
  scratch directory, open and bind no TCP port (ABI 4+; not UDP) and send
  no signal outside its domain (ABI 6+).  It runs as the worker's user, so
  what that user may read inside the allowed directories it may read too.
  The daemon is a child subreaper: whatever a task process started is
  reparented to it and killed when that task process ends.  The task
  process drops every capability (a worker run as root keeps none for its
  tasks).  Processes per task are not capped in this layer.
* **rlimits**: each task process's address space is capped (``RLIMIT_AS``):
  its hard limit is all the memory the worker lends (``memory``), and before
  each lease's tasks the daemon lowers its soft limit to what they asked for
  (or a slot's share); a task that goes past it is stopped, its future
  fails saying so, and the worker carries on.  A task could raise its own
  soft limit back up to the hard one: this guards against mistakes, the
  hard limit against worse.

Set-up costs happen once per task process, never per task.  Without
bubblewrap tasks run unsandboxed, and the worker says so loudly.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import select
import shutil
import site
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import portability
from ..protocol.resources import format_size
from .privileges import pid_cap_command
from .seccomp import unix_sockets_denied

NOBODY = 65534
LANDLOCK_ENV = "P2PEXEC_LANDLOCK"  # the rules a task process applies to itself (JSON)
SLOT_ENV = "P2PEXEC_SLOT"  # marks a task process's descendants as its own
_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# World-readable configuration a program may need; the rest of /etc (shadow, ssh host keys) stays out.
_ETC = ("/etc/alternatives", "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
        "/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/hosts", "/etc/resolv.conf", "/etc/ssl/certs",
        "/etc/ssl/openssl.cnf", "/etc/ca-certificates", "/etc/mime.types", "/etc/os-release", "/etc/timezone")
_DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/dev/shm")  # what a Landlocked task may open
# The only variables of the worker's that a sandboxed task gets: what running Python and its libraries needs.
# Not the rest: the friend's shell may hold tokens, cloud keys, proxies with passwords, an ssh-agent's socket.
_KEPT = frozenset({"PATH", "LANG", "LANGUAGE", "TZ", "LD_LIBRARY_PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED",
                   "PYTHONIOENCODING", "PYTHONUTF8", "PYTHONWARNINGS", "PYTHONFAULTHANDLER", "PYTHONHASHSEED",
                   "P2PEXEC_PORTABLE", "CUDA_HOME", "CUDA_PATH"})


def python_paths(package_root: str) -> list[str]:
    """Directories a task process needs to run this Python and import p2pexec and installed packages."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable)),
             package_root, *site.getsitepackages(), *filter(None, [site.getusersitepackages()]),
             *(sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib"))}
    real = {os.path.realpath(p) for p in paths if os.path.isdir(p)}
    return sorted(p for p in real if not any(p != q and p.startswith(q + os.sep) for q in real))


@dataclass(frozen=True)
class Sandbox:
    """How task processes are started; :func:`detect` builds one for this machine."""

    bwrap: str | None  # a bubblewrap that works here, or None
    network: bool = False
    memory: int | None = None  # bytes of address space a task process may ever have (its hard limit)
    why_not: str = "turned off"  # without any layer: why
    landlock: int = 0  # Landlock ABI to confine task processes with, where there is no bubblewrap
    processes: int | None = None  # PIDs per task process and all it starts, where enforced
    processes_why_not: str = ""  # why processes are not capped although asked to be
    gpus: bool = False  # the worker shares GPUs: tasks see the NVIDIA devices (each slot's own, through CUDA)

    @property
    def layer(self) -> str | None:
        return "bubblewrap" if self.bwrap else "landlock" if self.landlock else None

    @property
    def enforced(self) -> bool:
        return self.layer is not None

    def environment(self, inherited: Mapping[str, str], scratch: Path, package_root: str,
                    slot: int) -> dict[str, str]:
        """A task process's variables: the daemon's (``inherited``) where there is no sandbox; else only
        those in ``_KEPT`` and the locale's, with the scratch directory as HOME (and Landlock's rules)."""
        if not self.enforced:
            return {**inherited, SLOT_ENV: str(slot)}
        env = {k: v for k, v in inherited.items() if k in _KEPT or k.startswith("LC_")}
        env.update({SLOT_ENV: str(slot), "HOME": str(scratch), "TMPDIR": str(scratch)})
        if self.bwrap is None:
            env.update({LANDLOCK_ENV: json.dumps({
                # no /proc (other processes), no other /dev (a root worker's task would read its disks)
                "read": [*_SYSTEM, *_ETC, *python_paths(package_root), *_DEVICES,
                         *(sorted(glob.glob("/dev/nvidia*")) if self.gpus else [])],
                "write": [str(scratch), *_DEVICES],
                "network": self.network})})
        return env

    def command(self, argv: Sequence[str], scratch: Path, package_root: str, info_fd: int | None = None) -> list[str]:
        """``argv`` wrapped to run in the sandbox, with ``scratch`` as its only writable place.

        bubblewrap writes the sandbox's PIDs to ``info_fd`` (for :meth:`cap_command`).
        """
        if self.bwrap is None:
            return list(argv)
        wrapped = [self.bwrap, "--die-with-parent", "--new-session", "--unshare-all", "--unshare-user",
                   "--uid", str(NOBODY), "--gid", str(NOBODY), "--cap-drop", "ALL"]
        if self.network:
            wrapped.append("--share-net")
        if info_fd is not None:
            wrapped += ["--info-fd", str(info_fd)]
        for path in (*_SYSTEM, *_ETC):
            wrapped += ["--ro-bind-try", path, path]
        # Writable sysctls would let a root worker's task change the machine's; their PID cap is set from outside.
        # Mounts apply in order: the empty /tmp first, so that Python or p2pexec under /tmp stays visible.
        wrapped += ["--proc", "/proc", "--ro-bind", "/proc/sys", "/proc/sys", "--dev", "/dev", "--tmpfs", "/tmp"]
        for path in python_paths(package_root):
            wrapped += ["--ro-bind", path, path]
        if self.gpus:
            for device in sorted(glob.glob("/dev/nvidia*")):
                wrapped += ["--dev-bind-try", device, device]
        wrapped += ["--bind", str(scratch), str(scratch), "--chdir", str(scratch)]
        return [*wrapped, "--", *argv]

    def cap_command(self, sandbox_pid: int) -> list[str] | None:
        """The command that caps the PIDs of the sandbox whose first process is ``sandbox_pid``, if capped."""
        return None if self.processes is None else pid_cap_command(sandbox_pid, self.processes)

    def limits(self) -> Callable[[], None] | None:
        """A preexec function that applies the rlimits (in the child, before it runs anything)."""
        if self.memory is None or not portability.rlimits():
            return None
        import resource  # here, not in the child, and not at the top: Windows has none

        memory = self.memory

        def apply() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

        return apply

    def describe(self) -> list[str]:
        """What is enforced, one line per guarantee, for ``--check-sandbox`` and the start-up log."""
        if self.layer == "landlock":
            lines = [f"Landlock ABI {self.landlock}: tasks read only the system and Python directories, write only "
                     f"a private scratch directory (their HOME and TMPDIR), and signal nothing outside",
                     "tasks run as this user, without capabilities (the bubblewrap layer would add an unprivileged "
                     "user and a PID namespace: --sandbox-layer auto, with bubblewrap installed); whatever they "
                     "start is killed when their task process ends",
                     "tasks have no TCP (UDP is not covered)" if not self.network else
                     "tasks may use the network (--network)",
                     "tasks open no Unix socket (seccomp): not an ssh-agent's, /var/run/docker.sock or the "
                     "session bus" if unix_sockets_denied() else
                     f"NOT covered on {platform.machine()}: a Unix socket a task knows the path of (an "
                     f"ssh-agent's, /var/run/docker.sock, the session bus); bubblewrap covers it",
                     "NOT covered by Landlock: /dev/shm, which tasks share with your programs and other members' "
                     "tasks; bubblewrap covers it"]
        elif self.bwrap is None:
            after = ("; whatever they start is killed when their task process ends" if portability.procfs() else
                     " and leave processes behind")
            lines = [f"NOT SANDBOXED ({self.why_not}): tasks run as this user and can read its files (~/.ssh "
                     f"included), use the network{after}"]
        else:
            lines = [f"bubblewrap ({self.bwrap}): tasks see the system and Python read-only, a private scratch "
                     f"directory as HOME and TMPDIR, and none of this user's files",
                     "tasks run as an unprivileged user without capabilities, in their own PID namespace: "
                     "whatever they start dies with them",
                     *(["this worker runs as root: its tasks own root's files in the directories they see "
                        "(read-only); run it as an ordinary user"] if os.geteuid() == 0 else []),
                     "tasks have no network" if not self.network else "tasks may use the network (--network)"]
        lines.append("memory: not capped (--memory)" if not self.memory else
                     f"memory: each task within what it asked for (or a slot's share of --memory), "
                     f"{format_size(self.memory)} of address space at most" if portability.rlimits() else
                     "memory: not capped: not enforced on this platform")
        if self.processes is not None:
            lines.append(f"processes: {self.processes} (up to {self.processes + 300}) processes and threads per "
                         f"task process, with all it starts")
        elif self.enforced:
            lines.append(f"processes: not capped ({self.processes_why_not or 'turned off with --max-processes 0'})")
        return lines


def detect(network: bool = False, memory: int | None = None, enabled: bool = True, layer: str = "auto",
           processes: int | None = None) -> Sandbox:
    """The sandbox this machine supports: bubblewrap if it runs here (probed once), else Landlock, else none.

    ``layer`` (``auto``, ``bubblewrap`` or ``landlock``) insists on one;
    ``processes`` asks for a cap on PIDs per task process.
    """
    if not enabled:
        return Sandbox(None, network, memory, "turned off with --no-sandbox")
    if not portability.sandbox():
        why = "P2PEXEC_PORTABLE=1 is set" if portability.FORCED else "sandboxing needs Linux"
        return Sandbox(None, network, memory, f"not enforced on this platform: {why}")
    if layer == "landlock":
        return _landlock(network, memory, "", processes)
    bwrap = shutil.which("bwrap")
    if bwrap is not None:
        probe = [bwrap, "--unshare-all", "--unshare-user", "--uid", str(NOBODY), "--ro-bind", "/", "/", "--",
                 "/bin/true"]
        try:
            works = subprocess.run(probe, stdin=subprocess.DEVNULL, capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            works = False
        if works:
            why_not = "" if processes is None else _pid_cap_fails(bwrap, processes)
            return Sandbox(bwrap, network, memory, processes=None if why_not else processes,
                           processes_why_not=why_not)
        why = f"{bwrap} does not work here (user namespaces disabled?)"
    else:
        why = "bubblewrap is not installed: apt-get install bubblewrap"
    if layer == "bubblewrap":
        return Sandbox(None, network, memory, why)
    return _landlock(network, memory, why + "; ", processes)


def _pid_cap_fails(bwrap: str, processes: int) -> str:
    """Why PIDs cannot be capped here, after trying on a throwaway sandbox; empty if they can."""
    sandbox = Sandbox(bwrap, processes=processes)
    machine = Path("/proc/sys/kernel/pid_max").read_text()
    read, write = os.pipe()
    try:
        proc = subprocess.Popen(sandbox.command(["/bin/sh", "-c", "echo up; read line"], Path("/"), "/",
                                                info_fd=write),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                pass_fds=(write,))
    except OSError as exc:
        os.close(read)
        return f"bubblewrap failed: {exc}"
    finally:
        os.close(write)
    info = os.fdopen(read)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        if not ready or not proc.stdout.readline():  # set up and running, as a ready task process is
            return "the probe sandbox did not start within 10 s"
        pid = json.loads(info.read())["child-pid"]  # (written before the sandbox ran its command)
        command = sandbox.cap_command(pid)
        if command is None:
            return "needs Linux 6.14+ (a PID namespace's own pid_max) and nsenter"
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
        if done.returncode != 0:
            return f"nsenter failed: {done.stderr.strip()}"
        if Path("/proc/sys/kernel/pid_max").read_text() != machine:  # never on 6.14+; undo and say so if it is
            Path("/proc/sys/kernel/pid_max").write_text(machine)
            return "this kernel's pid_max is not per namespace"
        return ""
    except (OSError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
        return f"could not probe: {exc}"
    finally:
        info.close()
        proc.kill()
        proc.wait()


def _landlock(network: bool, memory: int | None, why: str, processes: int | None) -> Sandbox:
    from .landlock import abi

    version = abi()
    return Sandbox(None, network, memory, why + "the kernel has no Landlock", landlock=version,
                   processes_why_not="" if processes is None else "the Landlock layer has no PID namespace")
