"""A seccomp filter from plain ctypes: no new Unix sockets in a Landlocked task process.

Landlock has no rule for ``connect()`` to a Unix socket by its path, so a
task that knows one (an ssh-agent's, ``/var/run/docker.sock``, the session
bus) could talk to it.  This filter makes ``socket(AF_UNIX, ...)`` fail
with ``EACCES``; ``socketpair()`` (already connected, no path: what
``multiprocessing`` and asyncio use) still works, and so do the sockets a
task process inherits.  ``io_uring_setup`` fails too (io_uring can make
sockets without the ``socket`` call), and so does any call of another
architecture's ABI (x32 on x86_64).  Known architectures only:
:func:`deny_unix_sockets` says whether it applied.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct

from .privileges import libc

_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
_LD_W_ABS, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, ...
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000
_NR, _ARCH, _ARG0 = 0, 4, 16  # offsets in struct seccomp_data (args[0]'s low half, little-endian)
_AF_UNIX = 1
_X32_BIT = 0x40000000
# machine -> (AUDIT_ARCH_*, __NR_socket, __NR_io_uring_setup)
_ARCHES = {"x86_64": (0xC000003E, 41, 425), "aarch64": (0xC00000B7, 198, 425)}


def _program(arch: int, socket_nr: int, uring_nr: int) -> bytes:
    deny = _RET_ERRNO | errno.EACCES
    code = [
        (_LD_W_ABS, 0, 0, _ARCH),
        (_JEQ_K, 1, 0, arch),  # another ABI's calls: denied
        (_RET_K, 0, 0, deny),
        (_LD_W_ABS, 0, 0, _NR),
        (_JGE_K, 0, 1, _X32_BIT),
        (_RET_K, 0, 0, deny),
        (_JEQ_K, 0, 1, uring_nr),
        (_RET_K, 0, 0, deny),
        (_JEQ_K, 0, 3, socket_nr),
        (_LD_W_ABS, 0, 0, _ARG0),
        (_JEQ_K, 0, 1, _AF_UNIX),
        (_RET_K, 0, 0, deny),
        (_RET_K, 0, 0, _RET_ALLOW),
    ]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in code)


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def unix_sockets_denied() -> bool:
    """Does :func:`deny_unix_sockets` know this machine's architecture?"""
    return platform.machine() in _ARCHES


def deny_unix_sockets() -> bool:
    """Install the filter on this process and its future children (needs no_new_privs, which Landlock set);
    False on an architecture it does not know.  Raises OSError if the kernel refuses it."""
    known = _ARCHES.get(platform.machine())
    if known is None:
        return False
    code = _program(*known)
    program = ctypes.create_string_buffer(code, len(code))
    fprog = _Fprog(len(code) // 8, ctypes.addressof(program))
    if libc().prctl(ctypes.c_int(_PR_SET_SECCOMP), ctypes.c_ulong(_SECCOMP_MODE_FILTER),
                    ctypes.c_void_p(ctypes.addressof(fprog)), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")
    return True
