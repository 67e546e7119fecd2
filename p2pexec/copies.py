"""Big ``bytes`` and ``bytearray`` copied out of a buffer with their pages faulted in by one call.

Copying a received buffer into a new ``bytes`` is what a big ``bytes``
argument costs a task process, and a big ``bytes`` result the client.
From 32 MiB on (glibc's largest mmap threshold) ``malloc`` maps such an
object's memory anew, and ``bytes(view)`` then faults it in one 4 KiB
page at a time: 0.17-0.20 s for 256 MiB here.  ``madvise(MADV_POPULATE_WRITE)``
(Linux 5.14) has the kernel fill the whole range in one call first, and
the copy that follows touches only present pages: 0.10-0.14 s.  Below
that size, on other systems and other Pythons, and where the call is
refused, it is ``bytes(view)``, which is just as fast there.
"""

from __future__ import annotations

import errno
import functools
import mmap
import sys
from typing import Any, Callable, TypeVar

FRESH = 32 << 20  # from this size on, a new object's memory is (as a rule) new to the process
_MADV_POPULATE_WRITE = 23
_PAGE = mmap.PAGESIZE
_NEVER = (errno.EINVAL, errno.ENOSYS, errno.EPERM)  # (a kernel without it, a filter refusing it)
Copy = TypeVar("Copy", bytes, bytearray)


class _Native:
    """The C calls a fast copy needs: function objects of our own (``ctypes.pythonapi``'s attributes are
    shared by the whole process, and another library may declare them otherwise)."""

    def __init__(self) -> None:
        import ctypes

        self.ctypes = ctypes
        self.madvise = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                        use_errno=True)(("madvise", ctypes.CDLL(None)))
        made = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_ssize_t)
        self.new: dict[type, Callable[[None, int], Any]] = {  # uninitialised: bytearray(n) writes zeros first
            bytes: made(("PyBytes_FromStringAndSize", ctypes.pythonapi)),
            bytearray: made(("PyByteArray_FromStringAndSize", ctypes.pythonapi))}
        self.populates = True  # until the kernel refuses it for good

    def address(self, obj: bytes | bytearray) -> int:
        ctypes = self.ctypes
        if isinstance(obj, bytearray):
            return ctypes.addressof(ctypes.c_char.from_buffer(obj))
        return ctypes.cast(ctypes.c_char_p(obj), ctypes.c_void_p).value or 0  # (a bytes' own storage)

    def populate(self, at: int, size: int) -> None:
        start, end = -(-at // _PAGE) * _PAGE, (at + size) // _PAGE * _PAGE
        if self.populates and end > start and self.madvise(start, end - start, _MADV_POPULATE_WRITE) != 0:
            if self.ctypes.get_errno() in _NEVER:  # (else, say ENOMEM near a memory limit: this once)
                self.populates = False  # faulted in as it is copied, as bytes() does

    def copy(self, view: memoryview, kind: type[Copy]) -> Copy:
        size = view.nbytes
        out: Copy = self.new[kind](None, size)
        if type(out) is not kind or len(out) != size:  # (never: but written into blindly otherwise)
            raise SystemError(f"{kind.__name__} of {size} bytes came out as {type(out).__name__}")
        at = self.address(out)
        self.populate(at, size)
        memoryview((self.ctypes.c_char * size).from_address(at)).cast("B")[:] = view.cast("B")
        return out


@functools.cache
def _lookup() -> _Native | None:
    if not sys.platform.startswith("linux") or sys.implementation.name != "cpython":
        return None
    try:
        return _Native()
    except (ImportError, OSError, AttributeError):  # (a Python built without ctypes)
        return None


def copied(source: Any, kind: type[Copy]) -> Copy:
    """``kind(source)``, faster for big buffers (see the module's docstring)."""
    view = memoryview(source)
    size = view.nbytes
    native = _lookup() if size >= FRESH and size and view.c_contiguous else None
    return kind(view) if native is None else native.copy(view, kind)
