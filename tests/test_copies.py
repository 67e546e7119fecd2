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
    monkeypatch.setattr(always_native, "populates", True)
    always_native.populate(0, 2 * copies._PAGE)  # nothing is mapped at 0: the kernel refuses
    assert always_native.populates is False  # (not asked again)
    data = bytes(range(256)) * 100
    assert copies.copied(memoryview(data), bytes) == data


def test_big_copies_take_the_native_path():
    if not native_here:
        pytest.skip("the native path is Linux and CPython only")
    data = bytes(range(256)) * ((copies.FRESH + 256) // 256)
    out = copies.copied(memoryview(data), bytes)
    assert out == data and out is not data
    assert copies._lookup() is not None and copies._lookup().populates  # (this kernel has MADV_POPULATE_WRITE)
