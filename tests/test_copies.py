"""Big bytes and bytearrays copied with their pages faulted in at once: the same objects bytes() would make."""

from __future__ import annotations

import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pexec import copies

native_here = sys.platform.startswith("linux") and sys.implementation.name == "cpython"


@pytest.fixture
def always_native(monkeypatch):
    """Every copy takes the native path, however small (the real threshold is 32 MiB)."""
    if not native_here:
        pytest.skip("the native path is Linux and CPython only")
    monkeypatch.setattr(copies, "FRESH", 0)
    native = copies._lookup()
    assert native is not None
    return native


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=3 * 4096 + 17), start=st.integers(0, 40), step=st.sampled_from([1, 1, 2]),
       kind=st.sampled_from([bytes, bytearray]))
def test_a_copy_is_what_bytes_or_bytearray_makes(always_native, data, start, step, kind):
    view = memoryview(data)[start::step]  # (a strided view is copied the plain way)
    out = copies.copied(view, kind)
    assert type(out) is kind and out == kind(view)
    if kind is bytearray and out:
        out[0] ^= 1  # its own memory
        assert out != kind(view)


def test_multidimensional_buffers_are_copied_flat(always_native):
    view = memoryview(bytes(range(24))).cast("B", (2, 3, 4))
    assert copies.copied(view, bytes) == bytes(range(24))


def test_a_kernel_without_populate_still_copies(always_native, monkeypatch):
    import ctypes
    import errno

    monkeypatch.setattr(always_native, "populates", True)
    always_native.populate(0, 2 * copies._PAGE)  # nothing is mapped at 0: ENOMEM, refused this once
    assert always_native.populates is True

    def old_kernel(*args):
        ctypes.set_errno(errno.EINVAL)  # (what a kernel before 5.14 says; this one has the call)
        return -1

    monkeypatch.setattr(always_native, "madvise", old_kernel)
    data = bytes(range(256)) * 100
    assert copies.copied(memoryview(data), bytes) == data
    assert always_native.populates is False  # (not asked again)
    assert copies.copied(memoryview(data), bytearray) == data


def test_its_own_c_functions_whatever_others_declare(always_native, monkeypatch):
    import ctypes

    monkeypatch.setattr(ctypes.pythonapi.PyBytes_FromStringAndSize, "restype", ctypes.c_void_p)  # (shared)
    data = b"A" * 200
    out = copies.copied(memoryview(data), bytes)
    assert type(out) is bytes and out == data


def test_big_copies_take_the_native_path(monkeypatch):
    native = copies._lookup()
    if native is None:
        pytest.skip("the native path is Linux and CPython only")
    taken = []
    monkeypatch.setattr(native, "populate", lambda at, size: taken.append(size))
    data = bytes(range(256)) * ((copies.FRESH + 256) // 256)
    out = copies.copied(memoryview(data), bytes)
    assert out == data and out is not data and taken == [len(data)]
    assert copies.copied(memoryview(data)[: copies.FRESH - 1], bytes) == data[: copies.FRESH - 1]
    assert taken == [len(data)]  # (below the threshold: bytes())
