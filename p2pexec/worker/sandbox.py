"""Where task processes run: a bubblewrap sandbox that shows them only what a task needs.

Layer by layer (what each guarantees):

* **bubblewrap** (``bwrap``, Debian package ``bubblewrap``): the task
  process gets its own mount, PID, IPC, UTS and (unless ``--network``)
  network namespaces.  It sees the system directories and this Python
  installation read-only, a private scratch directory (its ``HOME``,
  ``TMPDIR`` and working directory) and an empty ``/tmp``; nothing else of
  the worker's user: not ``$HOME``, ``~/.ssh``, the identity key, the
  members file, nor other processes (its ``/proc`` shows its own PID
  namespace).  It runs as an unprivileged user with no capabilities, even
  when the worker runs as root, and every process it starts dies with it
  (the PID namespace ends when the task process does).
* **rlimits**: with ``memory``, each task process's address space is
  capped (``RLIMIT_AS``); going over fails that task, the worker carries on.

Set-up costs happen once per task process, never per task.  Without
bubblewrap tasks run unsandboxed, and the worker says so loudly.
"""

from __future__ import annotations

import os
import resource
import shutil
import site
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534
_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# World-readable configuration a program may need; the rest of /etc (shadow, ssh host keys) stays out.
_ETC = ("/etc/alternatives", "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
        "/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/hosts", "/etc/resolv.conf", "/etc/ssl",
        "/etc/ca-certificates", "/etc/mime.types", "/etc/os-release", "/etc/timezone")
# Ways into the friend's accounts that a task has no business with.
_UNSET = ("SSH_AUTH_SOCK", "SSH_AGENT_PID", "P2PEXEC_IDENTITY", "DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR")


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

    bwrap: str | None  # a bubblewrap that works here, or None: no sandbox
    network: bool = False
    memory: int | None = None  # bytes of address space per task process
    why_not: str = "turned off"  # without bubblewrap: why

    @property
    def enforced(self) -> bool:
        return self.bwrap is not None

    def command(self, argv: Sequence[str], scratch: Path, package_root: str) -> list[str]:
        """``argv`` wrapped to run in the sandbox, with ``scratch`` as its only writable place."""
        if self.bwrap is None:
            return list(argv)
        wrapped = [self.bwrap, "--die-with-parent", "--new-session", "--unshare-all", "--unshare-user",
                   "--uid", str(NOBODY), "--gid", str(NOBODY), "--cap-drop", "ALL"]
        if self.network:
            wrapped.append("--share-net")
        for path in (*_SYSTEM, *_ETC):
            wrapped += ["--ro-bind-try", path, path]
        for path in python_paths(package_root):
            wrapped += ["--ro-bind", path, path]
        wrapped += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
                    "--bind", str(scratch), str(scratch), "--chdir", str(scratch),
                    "--setenv", "HOME", str(scratch), "--setenv", "TMPDIR", str(scratch)]
        for name in _UNSET:
            wrapped += ["--unsetenv", name]
        return [*wrapped, "--", *argv]

    def limits(self) -> Callable[[], None] | None:
        """A preexec function that applies the rlimits (in the child, before it runs anything)."""
        if self.memory is None:
            return None
        memory = self.memory

        def apply() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

        return apply

    def describe(self) -> list[str]:
        """What is enforced, one line per guarantee, for ``--check-sandbox`` and the start-up log."""
        if self.bwrap is None:
            lines = [f"NOT SANDBOXED ({self.why_not}): tasks run as this user and can read its files (~/.ssh "
                     f"included), use the network and leave processes behind"]
        else:
            lines = [f"bubblewrap ({self.bwrap}): tasks see the system and Python read-only, a private scratch "
                     f"directory as HOME and TMPDIR, and none of this user's files",
                     "tasks run as an unprivileged user without capabilities, in their own PID namespace: "
                     "whatever they start dies with them",
                     "tasks have no network" if not self.network else "tasks may use the network (--network)"]
        lines.append(f"memory: {self.memory} bytes of address space per task process" if self.memory else
                     "memory: not capped (--memory)")
        return lines


def detect(network: bool = False, memory: int | None = None, enabled: bool = True) -> Sandbox:
    """The sandbox this machine supports: bubblewrap if it runs here (probed once), else none."""
    if not enabled:
        return Sandbox(None, network, memory, "turned off with --no-sandbox")
    if not sys.platform.startswith("linux"):
        return Sandbox(None, network, memory, "sandboxing needs Linux")
    bwrap = shutil.which("bwrap")
    if bwrap is not None:
        probe = [bwrap, "--unshare-all", "--unshare-user", "--uid", str(NOBODY), "--ro-bind", "/", "/", "--",
                 "/bin/true"]
        try:
            works = subprocess.run(probe, stdin=subprocess.DEVNULL, capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            works = False
        if works:
            return Sandbox(bwrap, network, memory)
        return Sandbox(None, network, memory, f"{bwrap} does not work here (user namespaces disabled?)")
    return Sandbox(None, network, memory, "bubblewrap is not installed: apt-get install bubblewrap")
