"""Big ``bytes`` and ``bytearray`` copied out of a buffer with their pages faulted in by one call.

Copying a received buffer into a new ``bytes`` is what a big ``bytes``
argument costs a task process, and a big ``bytes`` result the client.
Above 32 MiB (glibc's largest mmap threshold) ``malloc`` always maps
memory anew, and ``bytes(view)`` then faults it in one 4 KiB page at a
time: 0.17-0.20 s for 256 MiB here.  ``madvise(MADV_POPULATE_WRITE)``
(Linux 5.14) has the kernel fill the whole range in one call first, and
the copy that follows touches only present pages: 0.11-0.14 s.  Below
that size, on other systems and other Pythons, and where the call fails,
it is ``bytes(view)``, which is just as fast there.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
from typing import Any, Callable, TypeVar

FRESH = 32 << 20  # from this size on, a new object's memory is always new to the process
_MADV_POPULATE_WRITE = 23
_PAGE = mmap.PAGESIZE
Copy = TypeVar("Copy", bytes, bytearray)


class _Native:
    """The C calls a fast copy needs, looked up once; None where they are missing."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.madvise = libc.madvise
        self.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.madvise.restype = ctypes.c_int
        self.new: dict[type, Callable[[None, int], Any]] = {}
        for kind, name in ((bytes, "PyBytes_FromStringAndSize"), (bytearray, "PyByteArray_FromStringAndSize")):
            new = getattr(ctypes.pythonapi, name)  # uninitialised: bytearray(n) would write zeros first
            new.argtypes, new.restype = [ctypes.c_void_p, ctypes.c_ssize_t], ctypes.py_object
            self.new[kind] = new
        self.populates = True  # until the kernel says otherwise (before 5.14: EINVAL)

    @staticmethod
    def address(obj: bytes | bytearray) -> int:
        if isinstance(obj, bytearray):
            return ctypes.addressof(ctypes.c_char.from_buffer(obj))
        return ctypes.cast(ctypes.c_char_p(obj), ctypes.c_void_p).value or 0  # (a bytes' own storage)

    def populate(self, at: int, size: int) -> None:
        start, end = -(-at // _PAGE) * _PAGE, (at + size) // _PAGE * _PAGE
        if self.populates and end > start and self.madvise(start, end - start, _MADV_POPULATE_WRITE) != 0:
            self.populates = False  # (an older kernel: faulted in as it is copied, as bytes() does)


@functools.cache
def _lookup() -> _Native | None:
    if not sys.platform.startswith("linux") or sys.implementation.name != "cpython":
        return None
    try:
        return _Native()
    except (OSError, AttributeError):
        return None


def copied(source: Any, kind: type[Copy]) -> Copy:
    """``kind(source)``, faster for big buffers (see the module's docstring)."""
    view = memoryview(source)
    size = view.nbytes
    native = _lookup() if size >= FRESH and size and view.c_contiguous else None
    if native is None:
        return kind(view)
    out: Copy = native.new[kind](None, size)
    at = native.address(out)
    native.populate(at, size)
    memoryview((ctypes.c_char * size).from_address(at)).cast("B")[:] = view.cast("B")
    return out
