"""The daemon reads the hop ahead (hop_reader.py): messages come out whole and in order, each file
descriptor with the header it was sent with, and a descriptor anywhere else breaks the hop."""

from __future__ import annotations

import os
import socket

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pexec.worker.hop import HEADER, INLINE, SHARED
from p2pexec.worker.hop_reader import HopBroken, HopReader

pytestmark = pytest.mark.timeout(60)

# (size of an INLINE body) or None for a SHARED header with one descriptor, as taskproc.py sends them
messages = st.lists(st.one_of(st.integers(0, 3000), st.none()), min_size=1, max_size=40)


def _send(sock: socket.socket, sequence: list[int | None]) -> list[int]:
    """Write ``sequence`` the way a task process does; returns the inode of each descriptor sent."""
    inodes = []
    for i, size in enumerate(sequence):
        if size is None:
            fd = os.memfd_create("outcome")
            inodes.append(os.fstat(fd).st_ino)
            socket.send_fds(sock, [HEADER.pack(SHARED, i, 0)], [fd])
            os.close(fd)
        else:
            sock.sendall(HEADER.pack(INLINE, i, size) + bytes([i % 256]) * size)
    return inodes


async def _read_all(reader: HopReader, count: int) -> list[tuple[int, int, bytes, list[int]]]:
    got = []
    for _ in range(count):
        header = await reader.header()
        assert header is not None
        (kind, number, size), fds = header
        body = bytearray(size)
        assert await reader.body(memoryview(body))
        got.append((kind, number, bytes(body), [os.fstat(fd).st_ino for fd in fds]))
        for fd in fds:
            os.close(fd)
    return got


@settings(max_examples=60, deadline=None)
@given(messages)
def test_every_message_comes_out_whole_with_its_own_descriptor(sequence):  # type: ignore[no-untyped-def]
    ours, theirs = socket.socketpair()
    try:
        inodes = _send(theirs, sequence)  # all of it waits on the socket: reads take several messages at once
        theirs.close()

        async def scenario():  # type: ignore[no-untyped-def]
            reader = HopReader(ours, fd_passing=True)
            got = await _read_all(reader, len(sequence))
            assert await reader.header() is None  # and then the hang-up
            return got

        got = trio.run(scenario)
    finally:
        ours.close()
        theirs.close()
    shared = iter(inodes)
    for i, (size, (kind, number, body, fds)) in enumerate(zip(sequence, got)):
        assert number == i
        if size is None:
            assert (kind, body, fds) == (SHARED, b"", [next(shared)])
        else:
            assert (kind, body, fds) == (INLINE, bytes([i % 256]) * size, [])


@pytest.mark.parametrize("where", ["with a body", "twice before a header took them"])
def test_a_descriptor_anywhere_but_with_its_header_breaks_the_hop_and_is_closed(where):  # type: ignore[no-untyped-def]
    ours, theirs = socket.socketpair()
    fd = os.memfd_create("stray")
    sent = os.fstat(fd).st_ino
    try:
        if where == "with a body":
            theirs.sendall(HEADER.pack(INLINE, 0, 10))
            socket.send_fds(theirs, [b"0123456789"], [fd])
        else:
            socket.send_fds(theirs, [b"0"], [fd])  # half a header
            socket.send_fds(theirs, [b"1"], [fd])
            theirs.sendall(HEADER.pack(INLINE, 0, 0)[2:])
        os.close(fd)

        def open_inodes() -> int:
            count = 0
            for name in os.listdir("/proc/self/fd"):
                try:
                    count += os.stat(f"/proc/self/fd/{name}").st_ino == sent
                except OSError:
                    pass
            return count

        async def scenario() -> None:
            reader = HopReader(ours, fd_passing=True)
            with pytest.raises(HopBroken):
                header = await reader.header()
                assert header is not None
                await reader.body(memoryview(bytearray(header[0][2])))

        trio.run(scenario)
        assert open_inodes() == 0  # none of them is left open in the daemon
    finally:
        ours.close()
        theirs.close()
