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
    from p2pexec.copies import FRESH

    with cluster.executor() as ex:
        for big in (os.urandom(3 * MIB), os.urandom(MIB) * (FRESH // MIB) + b"odd"):  # (copied either way)
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


def refused_beside_big_bytes():
    import collections

    return [collections.ChainMap(), b"x" * (8 * MIB)]  # ChainMap: off the allow-list


@pytest.mark.parametrize("task", [echo, refused_beside_big_bytes], ids=["result", "refused result"])
def test_a_big_results_message_is_let_go_once_read(cluster, task):
    """Not kept until the worker's next message, nor until Python's next full collection (gc is off here),
    nor, for a result refused, by the error its future holds."""
    import gc
    import mmap

    from p2pexec import UntrustedResultError
    from p2pexec.protocol.frames import Recycled
    from p2pexec.protocol.lease import HEARTBEAT_SECONDS

    from .conftest import wait_until

    def unviewed(memory: mmap.mmap) -> bool:
        try:
            memory.resize(len(memory))  # (refused while something views it)
        except BufferError:
            return False
        return True

    def messages() -> set[int]:
        """Big buffers, but for one a channel keeps to rebuild its next big message in (resting, and nothing
        has a view of it: the system may take its pages back)."""
        kept = {id(r._last) for r in gc.get_objects() if isinstance(r, Recycled) and r._resting and unviewed(r._last)}
        return {id(m) for m in gc.get_objects() if isinstance(m, mmap.mmap) and len(m) >= 8 * MIB} - kept

    with cluster.executor() as ex:
        ex.submit(echo, b"warm").result(timeout=60)
        was = gc.isenabled()
        gc.collect()
        before = messages()  # (another test's, on this pytest worker)
        gc.disable()
        try:
            future = ex.submit(task, os.urandom(8 * MIB)) if task is echo else ex.submit(task)
            if task is echo:
                assert len(future.result(timeout=60)) == 8 * MIB
            else:
                assert isinstance(future.exception(timeout=60), UntrustedResultError)
            wait_until(lambda: not messages() - before, timeout=HEARTBEAT_SECONDS / 2,
                       what="the result's message to be freed")
            assert future.done()  # (held to here: its result or error must not hold the message)
        finally:
            if was:
                gc.enable()


def own_pid(data):
    return os.getpid()


def _held_kib(pid: int) -> int:
    """A process's own memory and the shared memory it maps, in KiB."""
    with open(f"/proc/{pid}/status") as status:
        return sum(int(line.split()[1]) for line in status if line.startswith(("RssAnon:", "RssShmem:")))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads a process's memory from /proc")
def test_neither_worker_nor_task_process_holds_a_finished_tasks_payload_while_waiting():
    from .conftest import wait_until

    with LocalCluster(workers=1, slots=1) as lc, lc.executor() as ex:
        task_process, worker = ex.submit(own_pid, b"warm").result(timeout=60), lc.workers[0].pid
        idle = _held_kib(task_process)
        assert ex.submit(own_pid, os.urandom(64 * MIB)).result(timeout=60) == task_process  # a value: cached
        wait_until(lambda: _held_kib(task_process) < idle + 24 * 1024, timeout=10,
                   what="the task process to let go of its last task's 64 MiB argument")
        cached = _held_kib(worker)
        parts = tuple(os.urandom(512 << 10) for _ in range(96))  # 48 MiB in small parts: one task message
        assert ex.submit(own_pid, parts).result(timeout=60) == task_process
        wait_until(lambda: _held_kib(worker) < cached + 24 * 1024 and _held_kib(task_process) < idle + 24 * 1024,
                   timeout=10, what="the worker and its task process to let go of a 48 MiB task message")
