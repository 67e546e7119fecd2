"""Large payloads stream in bounded chunks and travel out of band: memory stays bounded."""

from __future__ import annotations

import os

import pytest

from p2pexec import LocalCluster
from p2pexec.local import PeakMemory

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20


def echo(data):
    return data


def test_large_bytes_round_trip_with_bounded_client_memory():
    size = 256 * MIB
    with LocalCluster(workers=1) as lc, lc.executor() as ex:
        ex.submit(echo, b"warm").result()
        data = os.urandom(MIB) * (size // MIB)
        with PeakMemory() as memory:
            out = ex.submit(echo, data).result(timeout=100)
        assert out == data
        # received once into the reassembly buffer, once as the result bytes; nothing else
        assert memory.growth / size < 2.5


def test_a_big_array_result_is_held_once_where_it_arrived():
    np = pytest.importorskip("numpy")
    size = 128 * MIB
    with LocalCluster(workers=1) as lc, lc.executor() as ex:
        ex.submit(echo, b"warm").result()
        with PeakMemory() as memory:
            out = ex.submit(np.full, size // 8, 3.0).result(timeout=100)
        assert out.shape == (size // 8,) and out.flags.writeable and (out[::4096] == 3.0).all()
        # the message it came in, nothing else (dill's way was that, a copy as bytes, and the array)
        assert memory.growth / size < 1.5


def test_buffer_types_keep_their_type(cluster):
    with cluster.executor() as ex:
        big = os.urandom(3 * MIB)
        for value in (big, bytearray(big), memoryview(big)):
            back = ex.submit(echo, value).result()
            assert type(back) is type(value) and bytes(back) == big


def scribble(view):
    import hashlib

    before = hashlib.sha256(view).hexdigest()
    view[:] = bytes(len(view))  # a task may write into its arguments: its own copy, never the worker's
    return before, hashlib.sha256(view).hexdigest()


def test_tasks_may_write_into_big_buffer_arguments(cluster):
    import hashlib

    data = memoryview(bytearray(os.urandom(2 * MIB)))
    with cluster.executor() as ex:
        results = [f.result(timeout=60) for f in [ex.submit(scribble, data) for _ in range(4)]]
    zeros = hashlib.sha256(bytes(2 * MIB)).hexdigest()
    assert results == [(hashlib.sha256(data).hexdigest(), zeros)] * 4


def test_a_big_results_message_is_let_go_once_read(cluster):
    """Not kept until the worker's next message, nor until Python's next full collection (gc is off here)."""
    import gc
    import mmap

    from p2pexec.protocol.lease import HEARTBEAT_SECONDS

    from .conftest import wait_until

    size = 8 * MIB
    with cluster.executor() as ex:
        ex.submit(echo, b"warm").result(timeout=60)
        gc.disable()
        try:
            assert len(ex.submit(echo, os.urandom(size)).result(timeout=60)) == size
            wait_until(lambda: not [m for m in gc.get_objects() if isinstance(m, mmap.mmap) and len(m) >= size],
                       timeout=HEARTBEAT_SECONDS / 2, what="the result's message to be freed")
        finally:
            gc.enable()


def own_pid(data):
    return os.getpid(), len(data)


def _anonymous_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads a process's memory from /proc")
def test_a_task_process_lets_go_of_a_tasks_arguments_before_awaiting_the_next():
    from .conftest import wait_until

    size = 64 * MIB
    with LocalCluster(workers=1, slots=1) as lc, lc.executor() as ex:
        pid, _ = ex.submit(own_pid, b"warm").result(timeout=60)
        idle = _anonymous_kib(pid)
        assert ex.submit(own_pid, os.urandom(size)).result(timeout=60) == (pid, size)
        wait_until(lambda: _anonymous_kib(pid) < idle + size // 2048, timeout=10,
                   what="the task process to free its last task's 64 MiB argument")
