"""Cancelling work: Future.cancel(), P2PExecutor.interrupt() and shutdown(cancel_futures=True)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import time

import pytest

from p2pexec import LocalCluster

pytestmark = pytest.mark.timeout(120)


def hold(port, seconds=60):
    """Tell the test we run (a connection), then wait until released or killed (its EOF)."""
    import socket
    import time

    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.settimeout(seconds)
        try:
            return conn.recv(1).decode()
        except socket.timeout:
            time.sleep(seconds)  # still here: the interrupt did not stop us


def touch(path):
    with open(path, "w"):
        pass
    return path


@pytest.fixture
def one_slot(tmp_path):
    """One worker with one slot, and a listener that running tasks connect to."""
    with LocalCluster(workers=1, slots=1) as lc, socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(60)
        yield lc, listener


def test_interrupt_stops_a_running_task_and_frees_the_slot(one_slot):
    lc, listener = one_slot
    with lc.executor() as ex:
        future = ex.submit(hold, listener.getsockname()[1])
        task, _ = listener.accept()  # the task runs on the worker, in its only slot
        with task:
            started = time.monotonic()
            assert ex.interrupt(future) is True
            assert future.cancelled()
            with pytest.raises(concurrent.futures.CancelledError):
                future.result(timeout=0)
            assert concurrent.futures.wait([future], timeout=0).done == {future}
            task.settimeout(30)
            assert task.recv(1) == b""  # its task process was killed, not left sleeping
        assert ex.submit(abs, -3).result(timeout=30) == 3  # the slot is free again
        assert time.monotonic() - started < 30
        assert ex.interrupt(future) is True  # already cancelled
    assert lc.workers[0].popen.poll() is None


def test_interrupt_of_queued_finished_and_foreign_futures(one_slot):
    lc, listener = one_slot
    with lc.executor() as ex:
        done = ex.submit(abs, -1)
        assert done.result(timeout=30) == 1
        assert ex.interrupt(done) is False  # finished: nothing to stop
        running = ex.submit(hold, listener.getsockname()[1])
        waiting = ex.submit(abs, -2)
        task, _ = listener.accept()
        with task:
            assert ex.interrupt(waiting) is True
            assert waiting.cancelled()
            task.sendall(b"x")  # release the running one: it still finishes normally
            assert running.result(timeout=30) == "x"
        with pytest.raises(ValueError, match="submit"):
            ex.interrupt(concurrent.futures.Future())
        assert ex.submit(abs, -4).result(timeout=30) == 4


def test_interrupt_is_seen_by_as_completed_and_asyncio(one_slot):
    lc, listener = one_slot
    with lc.executor() as ex:

        async def main():
            loop = asyncio.get_running_loop()
            waiter = loop.run_in_executor(ex, hold, listener.getsockname()[1])
            task, _ = await loop.run_in_executor(None, listener.accept)
            with task:
                (future,) = [f for f in ex._unfinished]
                assert ex.interrupt(future)
                with pytest.raises(asyncio.CancelledError):
                    await asyncio.wait_for(waiter, 30)

        asyncio.run(main())
        running = ex.submit(hold, listener.getsockname()[1])
        task, _ = listener.accept()
        with task:
            ex.interrupt(running)
            assert list(concurrent.futures.as_completed([running], timeout=30)) == [running]


def test_shutdown_cancel_futures_withdraws_work_queued_at_the_worker(one_slot, tmp_path, caplog):
    lc, listener = one_slot
    ex = lc.executor()
    try:
        # Short tasks first: once the worker knows tasks are short, it lets
        # the client queue several behind the running one.
        assert list(ex.map(abs, range(-50, 0))) == list(range(50, 0, -1))
        running = ex.submit(hold, listener.getsockname()[1])
        queued = [ex.submit(touch, str(tmp_path / f"{i}")) for i in range(20)]
        task, _ = listener.accept()
        with task, caplog.at_level(logging.INFO, logger="p2pexec.client"):
            ex.shutdown(wait=False, cancel_futures=True)
            finished, _ = concurrent.futures.wait(queued, timeout=30)
            assert set(finished) == set(queued)
            assert all(f.cancelled() for f in queued)
            task.sendall(b"y")  # the task that had started runs to its end
            assert running.result(timeout=30) == "y"
    finally:
        ex.shutdown(wait=True)
    assert "withdrawing" in caplog.text  # some had reached the worker's queue, and were withdrawn there
    assert os.listdir(tmp_path) == []  # none of them ran


def test_a_done_callback_can_interrupt_the_rest_and_ask_for_stats_and_capacity(one_slot):
    """"Once the first is done, stop the others": callbacks run on the executor's loop, which must not wait
    for itself (interrupt() raised there, and the stdlib only logged it)."""
    lc, listener = one_slot
    with lc.executor() as ex:
        first = ex.submit(hold, listener.getsockname()[1])
        task, _ = listener.accept()
        behind = ex.submit(hold, listener.getsockname()[1])  # queued behind it: the only slot is busy
        seen: list[object] = []
        first.add_done_callback(lambda _: seen.extend([ex.interrupt(behind), ex.stats().workers, ex.capacity()]))
        with task:
            task.sendall(b"x")
        assert first.result(timeout=30) == "x"
        with pytest.raises(concurrent.futures.CancelledError):
            behind.result(timeout=30)
        assert seen[0] is True and len(seen[1]) == 1 and seen[2] == 1, seen
        assert ex.submit(abs, -3).result(timeout=30) == 3  # its slot is free again
    assert ex.capacity() == 0  # shut down: no slot, and no error from the loop that ended
