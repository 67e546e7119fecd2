"""Which platform-specific fast paths this machine allows; each caller keeps a portable fallback.

The fast paths are Linux's (memfd, Landlock, bubblewrap, ``/proc``,
``prctl``, address-space limits) or POSIX's (``flock``, load average,
SCM_RIGHTS).  Each check is False where the platform lacks the feature,
and also everywhere when ``P2PEXEC_PORTABLE=1`` is set: read once, at
import, so that CI can run the core suite through the fallbacks on
Linux.  Worker daemons and their task processes inherit the variable
from whoever starts them (LocalCluster passes its environment on).
"""

from __future__ import annotations

import functools
import importlib
import os
import socket
import sys

#: ``P2PEXEC_PORTABLE=1``: behave as a platform with none of the fast paths.
FORCED = os.environ.get("P2PEXEC_PORTABLE") == "1"
_LINUX = sys.platform.startswith("linux")


def _allowed(present: bool) -> bool:
    return present and not FORCED


def _has(module: str, name: str) -> bool:
    """Does ``module`` import here and have ``name``?  (``fcntl`` and ``resource`` are missing on Windows.)"""
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


def memfd() -> bool:
    """Sealed memory files (``memfd_create``): big payloads and outcomes hop without a copy."""
    return _allowed(hasattr(os, "memfd_create") and _has("fcntl", "F_ADD_SEALS"))


def fd_passing() -> bool:
    """File descriptors sent over a Unix socket (SCM_RIGHTS), which is how a memfd reaches the other side."""
    return _allowed(hasattr(socket, "send_fds") and hasattr(socket, "CMSG_SPACE"))


def procfs() -> bool:
    """Linux's ``/proc``, for finding the processes a task left behind."""
    return _allowed(_LINUX and os.path.isdir("/proc/self"))


def prctl() -> bool:
    """Linux's ``prctl`` (non-dumpable daemon, child subreaper, dropping capabilities)."""
    return _allowed(_LINUX)


@functools.cache  # (asked for each lease; the answer never changes)
def hardware_aes() -> bool:
    """AES in the CPU (AES-NI, ARMv8's crypto extensions): where both ends have it, a lease's channel seals
    with AEGIS-256, several times faster than XChaCha20-Poly1305 there and constant-time."""
    import nacl.bindings  # noqa: F401  (sodium_init: until then libsodium reports no CPU features)
    from nacl._sodium import lib

    return _allowed(bool(lib.crypto_aead_aes256gcm_is_available()))


@functools.cache  # (asked for each lease: its probe maps and unmaps a page)
def lazy_free() -> bool:
    """Memory marked free that the system takes back only if it needs it (``MADV_FREE``), and maps that
    refuse to move while something views them (CPython's ``mmap.resize``, Linux's ``mremap``): a client
    rebuilds a big result in the last one's memory (:class:`.protocol.frames.Recycled`)."""
    import mmap

    if not (_LINUX and hasattr(mmap, "MADV_FREE") and hasattr(mmap, "MAP_ANONYMOUS")):
        return False
    probe = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        with memoryview(probe):
            probe.resize(2 * mmap.PAGESIZE)  # must be refused: an implementation that lets it move is unsafe
        return False
    except BufferError:
        return _allowed(True)
    except (OSError, ValueError, SystemError):
        return False
    finally:
        probe.close()


def sandbox() -> bool:
    """The sandbox layers (bubblewrap, Landlock), both Linux-only."""
    return _allowed(_LINUX)


def loadavg() -> bool:
    """``os.getloadavg`` (POSIX), which the worker shows in ``p2pexec status``."""
    return _allowed(hasattr(os, "getloadavg"))


def file_locks() -> bool:
    """``fcntl.flock`` (POSIX), so several workers may share one history file."""
    return _allowed(_has("fcntl", "flock"))


def rlimits() -> bool:
    """``resource.setrlimit(RLIMIT_AS)`` for the memory cap of task processes: Linux enforces it, macOS not."""
    return _allowed(_LINUX and _has("resource", "RLIMIT_AS"))

