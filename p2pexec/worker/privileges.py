"""What a task process may not keep: capabilities, and more processes than its cap.

Small wrappers over Linux interfaces that the standard library lacks
(``prctl``, ``capset``), shared by the daemon (non-dumpable, child
subreaper), the Landlock layer and the task process.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil

from .. import portability

_PR_CAPBSET_DROP, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4
_CAPABILITY_VERSION_3 = 0x20080522
PID_MAX_MIN = 301  # the kernel refuses a smaller pid_max
RESERVED_PIDS = 300  # PIDs the kernel skips once it wraps around
PER_NAMESPACE_PID_MAX = (6, 14)  # since this Linux, pid_max belongs to each PID namespace


def libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def prctl(option: int, value: int) -> bool:
    """``prctl(option, value)`` on this process; False where it failed or the platform has none."""
    if not portability.prctl():
        return False
    try:
        return libc().prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_capabilities() -> None:
    """Give up every capability for good: bounding set, ambient, effective and permitted.

    A worker run as root would otherwise hand its tasks root's powers
    (reboot, raw sockets, loading modules) wherever bubblewrap is missing.
    Raises OSError if a capability is left.
    """
    for cap in range(64):
        if not prctl(_PR_CAPBSET_DROP, cap) and ctypes.get_errno() == 22:  # EINVAL: past the last capability
            break
    prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    data = (_CapData * 2)()
    if libc().capset(ctypes.byref(_CapHeader(_CAPABILITY_VERSION_3, 0)), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    left = {k: v for k, v in capabilities().items() if k != "CapBnd" and v}  # only root can empty the bounding set
    if left:
        raise OSError(f"capabilities left after dropping them: {left}")


def capabilities() -> dict[str, int]:
    """This process's capability sets (``CapEff``, ``CapPrm``, ``CapBnd``, ...) as numbers."""
    with open("/proc/self/status") as f:
        return {k: int(v, 16) for k, v in re.findall(r"^(Cap\w+):\s*([0-9a-f]+)$", f.read(), re.M)}


def kernel_version() -> tuple[int, int]:
    found = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(found[1]), int(found[2])) if found else (0, 0)


def pid_cap_command(pid: int, processes: int) -> list[str] | None:
    """A command that caps the PID namespace of ``pid`` at ``processes`` PIDs, give or take 300 (threads count).

    It enters that namespace (``nsenter``, util-linux) and sets its own
    ``pid_max``.  None where the kernel keeps one pid_max for the whole
    machine (before Linux 6.14): writing it there would cap the machine.
    """
    nsenter = shutil.which("nsenter")
    if nsenter is None or kernel_version() < PER_NAMESPACE_PID_MAX:
        return None
    # After PIDs wrap, the kernel hands out only those above RESERVED_PIDS: so the first N always fit.
    limit = max(PID_MAX_MIN, processes + RESERVED_PIDS)
    return [nsenter, "--target", str(pid), "--user", "--pid", "--preserve-credentials", "--", "/bin/sh", "-c",
            f"echo {int(limit)} > /proc/sys/kernel/pid_max"]
